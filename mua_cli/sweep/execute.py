"""Where and how a sweep's trials run: units of work (batched.py groups LoRA trials that differ only in LR),
run in this process on one device, or by slots over every visible GPU (several per GPU when asked): threads of
this process, or worker processes for eager steps, all taking units from one queue.

This process alone writes the trial store: slots send results back, so SQLite never sees two writers.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import MuaError
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec

SMALL, MEDIUM = 30e6, 300e6  # base parameters: the size classes below
# Tokens in one batched step, by size class, from step times measured with the step a CUDA graph
# (docs/performance.md): small models gain most from batching, ~120M models a little, large ones too little
# for the memory it takes, so they run one trial per pass.
TOKENS_PER_STEP = {"small": 1 << 17, "medium": 1 << 16, "large": 1 << 13}


@dataclass
class Execution:
    """How to run, not what: none of this enters a trial's identity."""

    device: str = "cpu"  # resolved: cpu, cuda (every visible GPU) or cuda:N (that one)
    workers_per_gpu: int = 0  # 0: by the model's size
    batch_trials: int = 0  # LoRA trials per forward pass; 0: by the model's size on a GPU, 1 on the CPU
    cuda_graphs: bool = True  # replay each step as a CUDA graph where it can be captured (graphed.py)
    fused_kernels: bool = True  # on a GPU, Liger's fused kernels where installed (fused.py)


def size_class(n_params: int) -> str:
    return "small" if n_params < SMALL else "medium" if n_params < MEDIUM else "large"


def trials_per_pass(ex: Execution, recipe: Recipe, n_params: int) -> int:
    if ex.batch_trials:
        return ex.batch_trials
    if not ex.device.startswith("cuda"):
        return 1  # measured: no gain on the CPU (the work is the same, and it is compute-bound)
    tokens = recipe.batch_size * recipe.seq_len
    return max(1, min(16, TOKENS_PER_STEP[size_class(n_params)] // tokens))


def workers_per_gpu(ex: Execution, n_params: int) -> int:
    """Slots per GPU. With CUDA graphs two threads share a GPU below 300M parameters: while one builds a group's
    model, warms it up, captures or evaluates, the other's replays keep the GPU busy (measured by
    benchmarks/pool_start.py; docs/performance.md). Eager steps are bound by the host launching kernels:
    several processes share a GPU."""
    if ex.workers_per_gpu:
        return ex.workers_per_gpu
    if ex.cuda_graphs:
        return {"small": 2, "medium": 2, "large": 1}[size_class(n_params)]
    return {"small": 4, "medium": 2, "large": 1}[size_class(n_params)]


def planned(ex: Execution, recipe: Recipe, runner) -> tuple[int, int]:
    """On a GPU, slots per GPU and trials per pass: what speed asks for (the two functions above), made smaller
    where the memory estimate says it would not fit (memory.py). What the user set is taken as given."""
    slots, k = workers_per_gpu(ex, runner.n_params), trials_per_pass(ex, recipe, runner.n_params)
    from .memory import plan, usable_bytes

    lora = runner.memory(max(recipe.lora_ranks)) if recipe.lora_ranks else None
    full = runner.memory(None) if recipe.wants_full else None
    if slots > 1 and ex.cuda_graphs and not ex.workers_per_gpu and getattr(runner, "has_dropout", False):
        slots = 1  # dropout stepped by one thread while another captures breaks that capture (runner.py)
        if runner.on_note:
            runner.on_note("one slot per GPU: the model trains with dropout, whose random draws cannot run beside "
                           "another slot's CUDA graph capture")  # fmt: skip
    p = plan(lora, full, usable_bytes(runner.device), slots, k)
    if p.reason and runner.on_note:
        runner.on_note(p.reason)
    return ex.workers_per_gpu or p.slots, ex.batch_trials or p.k


def units(pending: list[TrialSpec], recipe: Recipe, k: int) -> list[list[TrialSpec]]:
    """Trials of one (regime, rank, seed) in groups of at most k, by LR; the rest one by one. Balanced groups:
    8 trials with k=6 make two groups of 4, not 6 and 2."""
    from ..train.batched import can_batch

    out: list[list[TrialSpec]] = []
    by_group: dict[tuple, list[TrialSpec]] = defaultdict(list)
    for s in pending:
        if k > 1 and can_batch(s, recipe):
            by_group[(s.regime, s.rank, s.seed)].append(s)
        else:
            out.append([s])
    for specs in by_group.values():
        specs.sort(key=lambda s: s.lr)
        n = math.ceil(len(specs) / k)
        size = math.ceil(len(specs) / n)
        out.extend(specs[i : i + size] for i in range(0, len(specs), size))
    return out


class LocalExecutor:
    """Every unit in this process's main thread, on one device (with per-step progress)."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, runner=None):
        from .runner import TrialRunner

        self.recipe, self.listener = recipe, listener
        if runner is None:
            runner = TrialRunner(recipe, ex.device, listener, ex.cuda_graphs, ex.fused_kernels)
        self.runner = runner
        self.k = trials_per_pass(ex, recipe, self.runner.n_params)
        if self.k > 1:
            listener.note(f"up to {self.k} LoRA trials per forward pass (batched adapters)")

    def run(self, pending: list[TrialSpec]) -> Iterator[tuple[TrialSpec, TrialResult]]:
        for unit in units(pending, self.recipe, self.k):
            self.listener.trial_start(unit[0])
            yield from zip(unit, self.runner.run_unit(unit), strict=True)

    def close(self, interrupted: bool = False) -> None:
        self.runner.close()


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


def worker_main(recipe: Recipe, device: str, graphs: bool, fused: bool, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    try:
        from .runner import TrialRunner

        runner = TrialRunner(recipe, device, _Notes(results, device), graphs, fused)
    except Exception as e:  # noqa: BLE001 — reported to the parent as one line
        results.put(("error", device, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", device, runner.n_params))
    _serve(runner, tasks, results)


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

    With CUDA graphs (the default) every slot is a thread of this process: a replayed step leaves the host
    idle, so one process keeps every GPU busy. The first slot's model is loaded (pretrained and cached, for the
    embedded model, if it must be) before the threads start; each other slot loads its own copy in its thread
    while the first runs units, where a worker process took ~10 s to start (Python, torch, the model).
    Eager steps are bound by the host launching kernels, so without graphs the slots after the first are worker
    processes."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, devices: list[str], first=None):
        """`first`: the first slot's runner, if made already; the pool owns it from here."""
        import torch.multiprocessing as mp

        from .runner import TrialRunner

        self.recipe, self.listener, self.ex = recipe, listener, ex
        self.ctx = mp.get_context("spawn")
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
                args = (recipe, device, ex.cuda_graphs, ex.fused_kernels, self.tasks, self.results)
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
        with _BUILD:  # a slot still loading its model would add it after this
            for runner in reversed(self.runners):
                runner.close()


# The CPU. A small model's step spends as much time in Python as in arithmetic, and its matrices are too small
# for threads to share well: one worker process of one thread per core runs more trials per hour than one
# process of every thread, and a process of two threads slows many times over when another program takes a
# core (benchmarks/first_run.py). Worker processes cost their start, so only sweeps long enough get them.
CPU_WORKER_START_S = 5.5  # CPU seconds of a worker process's start: Python, torch, transformers, peft, the model
CPU_TOKEN_PARAMS_PER_S = 8e9  # one core's pace on the embedded default's trials: tokens trained × base parameters
CPU_MAX_SLOTS = 4  # measured on 2 cores; more is a guess, and each slot holds its own process and model


def cpu_slots(ex: Execution, recipe: Recipe, n_params: int, trials: int) -> int:
    """Slots on the CPU: `--workers-per-gpu N` as given; else one per core (at most CPU_MAX_SLOTS) for a small
    model whose `trials` would take one core ten worker starts or more; else one (this process, every thread)."""
    if ex.workers_per_gpu:
        return ex.workers_per_gpu
    import torch

    cores = torch.get_num_threads()
    seconds = trials * recipe.steps * recipe.batch_size * recipe.seq_len * n_params / CPU_TOKEN_PARAMS_PER_S
    if cores < 2 or size_class(n_params) != "small" or seconds < 10 * CPU_WORKER_START_S:
        return 1
    return min(cores, CPU_MAX_SLOTS)


def _cpu_executor(recipe: Recipe, ex: Execution, listener, first, trials: int):
    """One slot: this process's main thread, with every thread torch has. More: this process and worker
    processes, the cores shared out among them as torch threads; this process's are given back on close."""
    import os

    import torch

    slots = cpu_slots(ex, recipe, first.n_params, trials)
    if slots == 1:
        return LocalExecutor(recipe, ex, listener, first)
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    threads = max(1, before // slots)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # a spawned worker's torch starts with this many threads
    try:
        pool = PoolExecutor(recipe, dataclasses.replace(ex, workers_per_gpu=slots), listener, ["cpu"], first)
    except BaseException:
        torch.set_num_threads(before)
        raise
    finally:
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env
    close = pool.close

    def close_and_restore(interrupted: bool = False) -> None:
        try:
            close(interrupted)
        finally:
            torch.set_num_threads(before)

    pool.close = close_and_restore
    return pool


def executor(recipe: Recipe, ex: Execution, listener, trials: int = 0):
    """Slots over every visible GPU (`cuda`), or several on one device (`--workers-per-gpu N`, or by the
    model's size on a GPU, or on the CPU by its size and the `trials` to run, 0 if not known: cpu_slots); this
    process's main thread when one slot is all there is. The first model is loaded here, before that choice,
    which depends on its size."""
    from .runner import TrialRunner

    devices = [ex.device]
    if ex.device == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise MuaError("no CUDA GPU is visible")
        ex = dataclasses.replace(ex, device=devices[0]) if len(devices) == 1 else ex
    first = TrialRunner(recipe, devices[0], listener, ex.cuda_graphs, ex.fused_kernels)
    if not devices[0].startswith("cuda"):
        return _cpu_executor(recipe, ex, listener, first, trials)
    # the memory plan, resolved here into explicit settings that every slot then follows
    slots, k = planned(dataclasses.replace(ex, device=devices[0]), recipe, first)
    ex = dataclasses.replace(ex, workers_per_gpu=slots, batch_trials=k)
    if len(devices) == 1 and slots == 1:
        return LocalExecutor(recipe, ex, listener, first)
    return PoolExecutor(recipe, ex, listener, devices, first)  # which closes `first` if it cannot start
