"""Slots over the visible GPUs (threads of this process) or over the CPU's cores (worker processes), every one
taking its next unit of trials from one queue; this process alone stores the results."""

from __future__ import annotations

import math
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import MuaError
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .execute import Execution, keep_freed_memory, trials_per_pass, units, workers_per_gpu


class _Notes:
    """A worker's notes (a failed graph capture, say) go to the parent, which shows them."""

    def __init__(self, results, device: str):
        self.results, self.device = results, device

    def note(self, message: str) -> None:
        self.results.put(("note", self.device, message))


def _serve(runner, tasks, results) -> None:
    while (unit := tasks.get()) is not None:
        for spec, result in zip(unit, runner.run_unit(unit), strict=True):
            results.put(("done", spec, result))


# What a CPU worker imports before it can train: its processes fork from a server that imported these once
# (multiprocessing's forkserver) instead of each starting Python and importing torch, transformers and peft again
# (benchmarks/first_run.py --parts workers).
WORKER_IMPORTS = ["mua_cli.quiet_libraries", "mua_cli.sweep.pool", "mua_cli.sweep.runner"]


def process_context(device: str):
    """CPU workers: forkserver where the platform has it. GPU workers: spawn, as a process forked from one that
    has asked CUDA anything cannot use it."""
    import torch.multiprocessing as mp

    if device != "cpu" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_IMPORTS)
    return ctx


def start_worker_server() -> None:
    """Starts the CPU workers' server now, without importing torch here: it imports on the core that idles while
    this process imports, and a sweep's first worker then starts at once. Unused (a GPU, one slot), it waits
    idle and ends with this process."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        from multiprocessing import forkserver

        forkserver.set_forkserver_preload(WORKER_IMPORTS)
        forkserver.ensure_running()


def worker_main(recipe: Recipe, device: str, graphs: bool, fused: bool, tasks, results, threads: int = 0) -> None:
    """A worker process: loads the workload and runs units until told to stop. `threads`: torch's, on the CPU."""
    exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    if device == "cpu":
        import torch

        keep_freed_memory()
        if threads:
            torch.set_num_threads(threads)
    try:
        from .runner import TrialRunner

        runner = TrialRunner(recipe, device, _Notes(results, device), graphs, fused)
    except Exception as e:  # noqa: BLE001 — reported to the parent as one line
        results.put(("error", device, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", device, runner.n_params))
    _serve(runner, tasks, results)


def exit_with_parent() -> None:
    """Ends this worker process as soon as the sweep that started it is gone, however it went (SIGKILL
    included). Left alone, a worker waits for its next unit forever: it holds both ends of the task queue's pipe,
    so no end-of-file comes (the forkserver that forked it ends with the sweep, but not its children)."""
    import multiprocessing
    import multiprocessing.connection
    import os

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])  # readable once the parent's end closes: it died
        os._exit(1)

    threading.Thread(target=watch, name="mua-parent-watch", daemon=True).start()


@dataclass
class _Slot:
    """A thread of this process that runs units on one device with its own runner."""

    device: str
    runner: object = None
    shares_gpu: bool = False  # with another slot: each then steps on its own stream, so that both run at once
    error: BaseException | None = None
    thread: threading.Thread | None = None


_BUILD = threading.Lock()  # one runner is built at a time: fusing kernels patches process-wide modules (fused.py)


class PoolExecutor:
    """Slots over the visible GPUs (or several on one device), every one taking its next unit from one queue.
    The main thread stores every result as it comes (a Ctrl-C loses only units cut off mid-way).

    With CUDA graphs every slot is a thread of this process: a replayed step leaves the host idle, so one
    process keeps every GPU busy. The first slot's model is loaded before the threads start; each other slot
    loads its own copy in its thread while the first runs units. Eager steps are bound by the host launching
    kernels, so without graphs (and on the CPU) the slots after the first are worker processes."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, devices: list[str], first=None,
                 after_close: Callable[[], None] | None = None):  # fmt: skip
        """`first`: the first slot's runner, if made already; the pool owns it from here. `after_close`: called
        last by close() (the CPU's executor gives this process's threads back there)."""
        import torch

        from .runner import TrialRunner

        self.recipe, self.listener, self.ex, self.after_close = recipe, listener, ex, after_close
        self.ctx = process_context(devices[0])
        self.tasks, self.results = self.ctx.Queue(), self.ctx.Queue()
        self.procs: list = []
        # a Ctrl-C stops the slots' threads at their next step check (close), so that none is inside torch
        # when the process exits
        self._stop = threading.Event()
        if first is None:
            first = TrialRunner(recipe, devices[0], self._own(devices[0]), ex.cuda_graphs, ex.fused_kernels)
        else:
            first.on_note, first.on_step = self._own(devices[0]).note, self._stop_point
        self.runners = [first]  # in the order built, closed in reverse: fused.py's process-wide patches nest
        self._shown = set(getattr(first, "notes", ()))  # what loading the workload said, said once
        self.k = trials_per_pass(ex, recipe, first.n_params)
        per = workers_per_gpu(ex, first.n_params)
        slots = [devices[i % len(devices)] for i in range(len(devices) * per)]
        threaded = ex.cuda_graphs and devices[0].startswith("cuda")
        self.slots = [_Slot(d, shares_gpu=threaded and slots.count(d) > 1) for d in (slots if threaded else slots[:1])]
        self.slots[0].runner = first
        try:
            for device in slots[len(self.slots) :]:
                threads = torch.get_num_threads() if device == "cpu" else 0  # as the CPU's executor set them
                args = (recipe, device, ex.cuda_graphs, ex.fused_kernels, self.tasks, self.results, threads)
                p = self.ctx.Process(target=worker_main, args=args, daemon=True)
                p.start()
                self.procs.append(p)
        except BaseException:  # the workers started so far stop, and this process's model (and Liger's patches) go
            for p in self.procs:
                p.terminate()
            first.close()
            raise
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._serve, args=(slot,), name=f"mua-{slot.device}", daemon=True)
            slot.thread.start()
        self.n_slots = len(slots)
        batched = f", up to {self.k} LoRA trials per forward pass" if self.k > 1 else ""
        how = (f"{len(self.slots)} slot(s), threads of this process" if threaded else
               f"{len(slots)} slot(s): this process and {len(self.procs)} worker process(es) starting")  # fmt: skip
        listener.note(f"{len(devices)} device(s) ({', '.join(devices)}): {how}{batched}")

    def run(self, pending: list[TrialSpec]) -> Iterator[tuple[TrialSpec, TrialResult]]:
        # no fewer units than slots where the trials allow it: an idle slot wastes its share of the GPU
        k = min(self.k, max(1, math.ceil(len(pending) / self.n_slots)))
        work = units(pending, self.recipe, k)
        for unit in work:
            self.tasks.put(unit)
        left = sum(len(u) for u in work)
        while left:
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]  # workers leave only when told
            if dead:
                msg = (f"a worker process died (exit code {dead[0].exitcode}); finished trials are stored, "
                       "run again to resume")  # fmt: skip
                raise MuaError(msg)
            for slot in self.slots:
                if slot.error is not None:
                    raise slot.error
            # results as they come, from every slot: each is stored at once
            if (message := self._get(timeout=0.5)) is not None:
                left -= 1
                yield message[1], message[2]

    def _own(self, device: str) -> SimpleNamespace:
        """A thread slot's listener: no per-step progress (several slots run at once); its step callback is where
        a Ctrl-C stops it; its notes reach the main thread through the results queue."""

        def note(message: str) -> None:
            if threading.current_thread() is threading.main_thread():
                self.listener.note(message)
            else:
                self.results.put(("note", device, message))

        return SimpleNamespace(note=note, step=self._stop_point)

    def _serve(self, slot: _Slot) -> None:
        """A slot's thread: loads its model if it has none yet, then runs units until told to stop."""
        import torch

        from .runner import TrialRunner

        try:
            if slot.device.startswith("cuda:"):  # the current GPU is per thread (Triton launches on it)
                torch.cuda.set_device(slot.device)
            if slot.runner is None:
                try:
                    with _BUILD:
                        if self._stop.is_set():
                            return
                        slot.runner = TrialRunner(self.recipe, slot.device, self._own(slot.device),
                                                  self.ex.cuda_graphs, self.ex.fused_kernels)  # fmt: skip
                        self.runners.append(slot.runner)
                except Exception as e:  # noqa: BLE001 — this slot takes no units; the others run them
                    self.results.put(("error", slot.device, f"{type(e).__name__}: {e}"))
                    return
            if slot.shares_gpu:
                # the base's copy to the GPU was made on the default stream. Not torch.cuda.synchronize: a
                # device-wide wait while another thread captures on the same GPU breaks that capture
                torch.cuda.default_stream(slot.device).synchronize()
                torch.cuda.set_stream(torch.cuda.Stream(slot.device))
            _serve(slot.runner, self.tasks, self.results)
        except BaseException as e:  # noqa: BLE001 — raised again by run(), in the main thread
            slot.error = e

    def _stop_point(self, step: int, loss: float) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt  # trials let it through: the unit stops, nothing of it is stored

    def _get(self, timeout: float):
        """The next result, or None if none comes within `timeout` seconds; notes are shown."""
        while True:
            try:
                message = self.results.get(timeout=timeout)
            except queue.Empty:
                return None
            if message[0] == "done":
                return message
            if message[0] == "error":  # it takes no units: the other slots run them
                self.listener.note(f"{message[1]} could not load the workload: {message[2]}")
            elif message[0] == "note" and message[2] not in self._shown:  # not the first model's notes again
                self._shown.add(message[2])
                self.listener.note(f"{message[1]}: {message[2]}")

    def close(self, interrupted: bool = False) -> None:
        """Slots finish their unit and stop; on Ctrl-C or an error they stop at once (a unit cut off mid-way was
        not stored, so it runs again next time)."""
        self._stop.set()
        for p in self.procs:
            if interrupted:
                p.terminate()
        for _ in range(len(self.slots) + (0 if interrupted else len(self.procs))):
            self.tasks.put(None)
        for slot in self.slots:
            slot.thread.join(timeout=60)  # a unit running stops at its next step check (every 10 steps)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        try:
            with _BUILD:  # a slot still loading its model would add it after this
                for runner in reversed(self.runners):
                    runner.close()
        finally:
            if self.after_close:
                self.after_close()
