"""Slots over the visible GPUs (threads of this process) or over the CPU's cores (slot processes), every one
taking its next unit of trials from one queue, for as long as the sweep feeds it: the slots, their loaded
workloads and their processes stay up from the sweep's first trial to its last. This process alone stores the
results."""

from __future__ import annotations

import contextlib
import math
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MuaError
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .forkserver import process_context
from .sizing import Execution, UnitCosts, keep_freed_memory, rides, slots_per_gpu, trials_per_pass, units
from .trainer import Trainer

LOSS_EVERY = 10  # steps between a running trial's losses sent to the main thread (Listener.loss)


def _serve(trainer: Trainer, tasks, results, on_step=None) -> None:
    """Units from `tasks` until a None; each trial's result, and every LOSS_EVERY steps its unit's loss, into
    `results`. `on_step`: also called at each step (a thread slot's stop point)."""
    while (unit := tasks.get()) is not None:

        def step(i: int, loss: float, unit=unit) -> None:
            if on_step:
                on_step(i, loss)
            if (i + 1) % LOSS_EVERY == 0:
                results.put(("loss", unit[0], (i, loss)))

        note = lambda message: results.put(("note", trainer.device, message))  # noqa: E731
        for spec, result in zip(unit, trainer.run_unit(unit, step, note), strict=True):
            results.put(("done", spec, result))


def slot_process(recipe: Recipe, device: str, graphs: bool, fused: bool, tasks, results, threads: int = 0) -> None:
    """A slot process: loads the workload and runs units until told to stop. `threads`: torch's, on the CPU."""
    exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops its slot processes
    if device == "cpu":
        import torch

        keep_freed_memory()
        if threads:
            torch.set_num_threads(threads)
    try:
        trainer = Trainer.load(recipe, device, lambda m: results.put(("note", device, m)), graphs, fused)
    except Exception as e:  # noqa: BLE001 — reported to the parent as one line
        results.put(("error", device, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", device, trainer.n_params))
    _serve(trainer, tasks, results)


def exit_with_parent() -> None:
    """Ends this slot process as soon as the sweep that started it is gone, however it went (SIGKILL
    included). Left alone, a slot process waits for its next unit forever: it holds both ends of the task queue's pipe,
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
    """A thread of this process that runs units on one device with its own trainer."""

    device: str
    trainer: Trainer | None = None
    shares_gpu: bool = False  # with another slot: each then steps on its own stream, so that both run at once
    error: BaseException | None = None
    thread: threading.Thread | None = None


_BUILD = threading.Lock()  # one trainer is built at a time: fusing kernels patches process-wide modules (fused.py)


class Pool:
    """Slots over the visible GPUs (or several on one device), every one taking its next unit from one queue that
    `submit` feeds at any time; `next` hands back each result as it comes, for the main thread to store (a Ctrl-C
    loses only units cut off mid-way).

    With CUDA graphs every slot is a thread of this process: a replayed step leaves the host idle, so one
    process keeps every GPU busy. The first slot's trainer is loaded before the threads start; each other slot
    loads its own copy in its thread while the first runs units. Eager steps are bound by the host launching
    kernels, so without graphs (and on the CPU) the slots after the first are slot processes."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, first: Trainer, slots: list[_Slot], procs: list,
                 ctx, after_close: Callable[[], None] | None = None):  # fmt: skip
        self.recipe, self.listener, self.ex, self.after_close = recipe, listener, ex, after_close
        self.slots, self.procs, self.ctx = slots, procs, ctx
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        # a Ctrl-C stops the slots' threads at their next step check (close), so that none is inside torch
        # when the process exits
        self._stop = threading.Event()
        self.trainers = [first]  # in the order built, closed in reverse: fused.py's process-wide patches nest
        self._shown = set(first.notes)  # what loading the workload said, said once
        self.k = trials_per_pass(ex, recipe, first.n_params)
        self.rides = rides(self.k, first.n_params)
        self.n_slots = len(slots) + len(procs)
        self.units_out = 0  # units queued or running
        self.left: dict[int, int] = {}  # unit id → its trials not yet back
        self.unit: dict[int, list[TrialSpec]] = {}  # unit id → the unit, until its trials are back
        self.costs = UnitCosts(recipe, first.n_params)  # the order units are queued in, refined as they finish
        self.unit_of: dict[str, int] = {}  # trial key → its unit's id
        self.outstanding = 0  # trials queued or running
        self._ids = 0

    @property
    def trainer(self) -> Trainer:
        """The first slot's trainer, loaded before the slots started."""
        return self.trainers[0]

    @classmethod
    def start(cls, recipe: Recipe, ex: Execution, listener, devices: list[str], first: Trainer,
              after_close: Callable[[], None] | None = None) -> Pool:  # fmt: skip
        """Starts the slots: `first` (the first slot's trainer, loaded; the pool owns it from here) and one more
        per slot, in threads of this process (CUDA graphs) or slot processes. `after_close`: called last by
        close() (the CPU gives this process's threads back there)."""
        import torch

        per = slots_per_gpu(ex, first.n_params)
        every = [devices[i % len(devices)] for i in range(len(devices) * per)]
        threaded = ex.cuda_graphs and devices[0].startswith("cuda")
        slots = [_Slot(d, shares_gpu=threaded and every.count(d) > 1) for d in (every if threaded else every[:1])]
        slots[0].trainer = first
        pool = cls(recipe, ex, listener, first, slots, [], process_context(devices[0]), after_close)
        try:
            for device in every[len(slots) :]:
                threads = torch.get_num_threads() if device == "cpu" else 0  # as the CPU's slots set them
                args = (recipe, device, ex.cuda_graphs, ex.fused_kernels, pool.tasks, pool.results, threads)
                p = pool.ctx.Process(target=slot_process, args=args, daemon=True)
                p.start()
                pool.procs.append(p)
        except BaseException:  # the processes started so far stop, and this process's model (and Liger's patches) go
            for p in pool.procs:
                p.terminate()
            first.close()
            raise
        for slot in slots:
            slot.thread = threading.Thread(target=pool._serve, args=(slot,), name=f"mua-{slot.device}", daemon=True)
            slot.thread.start()
        batched = f", up to {pool.k} LoRA trials per forward pass" if pool.k > 1 else ""
        how = (f"{len(slots)} slot(s), threads of this process" if threaded else
               f"{len(every)} slot(s): this process and {len(pool.procs)} slot process(es) starting")  # fmt: skip
        listener.note(f"{len(devices)} device(s) ({', '.join(devices)}): {how}{batched}")
        return pool

    def submit(self, specs: list[TrialSpec], spare: list[TrialSpec] = ()) -> list[list[TrialSpec]]:
        """Queues `specs` as units, at once: the slots take them as they free up. Where slots would idle, no fewer
        units than idle slots; else units as large as a pass allows. `spare`: trials that may ride along in a
        unit with room, up to a full pass, where the model is small (sizing.rides); their results come back like
        any other. The costliest first (sizing.UnitCosts), so that no slot is left running a long unit alone at the
        end. Returns the units queued."""
        if not specs:
            return []
        idle = max(1, self.n_slots - self.units_out)
        k = min(self.k, max(1, math.ceil(len(specs) / idle)))
        queued = self.costs.longest_first(units(specs, self.recipe, k, spare if self.rides else (), room=self.k))
        for unit in queued:
            uid = self._ids = self._ids + 1
            self.left[uid], self.unit[uid] = len(unit), unit
            for s in unit:
                self.unit_of[s.key] = uid
            self.units_out += 1
            self.outstanding += len(unit)
        self._size_kept()  # before any slot takes the new units: a larger one shrinks the kept units' room first
        for unit in queued:
            self.tasks.put(unit)
        return queued

    def _size_kept(self) -> None:
        """Each GPU's kept units get the room beside the largest unit queued or running (Trainer.size_kept)."""
        k = max(map(len, self.unit.values()), default=1)
        for trainer in list(self.trainers):  # a slot's thread may be adding its trainer
            trainer.size_kept(self.ex.workers_per_gpu, k)

    def next(self) -> tuple[TrialSpec, TrialResult]:
        """The next finished trial, from any slot (waits for it); running trials' losses go to the listener."""
        while True:
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]  # slot processes leave only when told
            if dead:
                msg = (f"a slot process died (exit code {dead[0].exitcode}); finished trials are stored, "
                       "run again to resume")  # fmt: skip
                raise MuaError(msg)
            for slot in self.slots:
                if slot.error is not None:
                    raise slot.error
            if (message := self._get(timeout=0.5)) is not None:
                spec = message[1]
                self.outstanding -= 1
                uid = self.unit_of.pop(spec.key, None)
                if uid is not None:
                    self.left[uid] -= 1
                    if not self.left[uid]:
                        del self.left[uid]
                        self.units_out -= 1
                        info = message[2].info
                        if "finished_at" in info:
                            self.costs.record(self.unit[uid], info["finished_at"] - info["started_at"])
                        del self.unit[uid]
                        self._size_kept()
                return spec, message[2]

    def _serve(self, slot: _Slot) -> None:
        """A slot's thread: loads its trainer if it has none yet, then runs units until told to stop."""
        import torch

        try:
            if slot.device.startswith("cuda:"):  # the current GPU is per thread (Triton launches on it)
                torch.cuda.set_device(slot.device)
            if slot.trainer is None:
                try:
                    with _BUILD:
                        if self._stop.is_set():
                            return
                        slot.trainer = Trainer.load(self.recipe, slot.device, self._note(slot.device),
                                                    self.ex.cuda_graphs, self.ex.fused_kernels)  # fmt: skip
                        kept = next((t.warm for t in self.trainers if t.device == slot.device), None)
                        slot.trainer.keep_warm(self.ex.workers_per_gpu, self.k, kept)  # one cache per GPU
                        self.trainers.append(slot.trainer)
                except Exception as e:  # noqa: BLE001 — this slot takes no units; the others run them
                    self.results.put(("error", slot.device, f"{type(e).__name__}: {e}"))
                    return
            if slot.shares_gpu:
                # the base's copy to the GPU was made on the default stream. Not torch.cuda.synchronize: a
                # device-wide wait while another thread captures on the same GPU breaks that capture
                torch.cuda.default_stream(slot.device).synchronize()
                # priority 0, never a side stream (accel/graphed.side_stream): another slot's capture records there
                torch.cuda.set_stream(torch.cuda.Stream(slot.device))
            _serve(slot.trainer, self.tasks, self.results, self._stop_point)
        except BaseException as e:  # noqa: BLE001 — raised again by next(), in the main thread
            slot.error = e

    def _note(self, device: str) -> Callable[[str], None]:
        """A thread slot's notes reach the main thread through the results queue (the listener is the main
        thread's)."""

        def note(message: str) -> None:
            if threading.current_thread() is threading.main_thread():
                self.listener.note(message)
            else:
                self.results.put(("note", device, message))

        return note

    def _stop_point(self, step: int, loss: float) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt  # trials let it through: the unit stops, nothing of it is stored

    def _get(self, timeout: float):
        """The next result, or None if none comes within `timeout` seconds; notes are shown, losses passed on."""
        while True:
            try:
                message = self.results.get(timeout=timeout)
            except queue.Empty:
                return None
            if message[0] == "done":
                return message
            if message[0] == "loss":
                self.listener.loss(message[1], *message[2])
            elif message[0] == "error":  # it takes no units: the other slots run them
                self.listener.note(f"{message[1]} could not load the workload: {message[2]}")
            elif message[0] == "note" and message[2] not in self._shown:  # not the first model's notes again
                self._shown.add(message[2])
                self.listener.note(f"{message[1]}: {message[2]}")

    def close(self, interrupted: bool = False) -> None:
        """Slots finish their unit and stop; on Ctrl-C or an error they stop at once (a unit cut off mid-way was
        not stored, so it runs again next time)."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # units nobody waits for any more (trials that rode along)
            while True:
                self.tasks.get_nowait()
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
            with _BUILD:  # a slot still loading its trainer would add it after this
                for trainer in reversed(self.trainers):
                    trainer.close()
        finally:
            if self.after_close:
                self.after_close()
