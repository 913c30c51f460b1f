"""Where a sweep's trials run: one slot in this process's main thread (`Inline`), or a pool of slots over every
visible GPU, or over the CPU's cores (pool.py). `start` loads the first trainer, whose size decides which.

Both take trials at any time (`submit`) and hand back each result as it comes (`next`); the sweep keeps them
fed (stream.py), so that a slot never waits for a round to end.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from ..errors import MuaError
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .pool import Pool
from .sizing import Execution, cpu_slots, keep_freed_memory, planned, rides, trials_per_pass, units
from .trainer import Trainer


class Inline:
    """Every unit in this process's main thread, on one device, with per-step progress (Listener.step)."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, trainer: Trainer):
        self.recipe, self.listener, self.trainer = recipe, listener, trainer
        self.k = trials_per_pass(ex, recipe, trainer.n_params)
        self.rides = rides(self.k, trainer.n_params)
        self.queue: deque[list[TrialSpec]] = deque()
        self.ready: deque[tuple[TrialSpec, TrialResult]] = deque()
        if self.k > 1:
            listener.note(f"up to {self.k} LoRA trials per forward pass (batched adapters)")

    @property
    def outstanding(self) -> int:
        return sum(map(len, self.queue)) + len(self.ready)

    def submit(self, specs: list[TrialSpec], spare: list[TrialSpec] = ()) -> list[list[TrialSpec]]:
        queued = units(specs, self.recipe, self.k, spare if self.rides else ())
        self.queue.extend(queued)
        return queued

    def next(self) -> tuple[TrialSpec, TrialResult]:
        """Runs the next unit when no result of the last one is left."""
        if not self.ready:
            unit = self.queue.popleft()
            self.trainer.size_kept(1, len(unit))
            self.listener.trial_start(unit[0])
            results = self.trainer.run_unit(unit, self.listener.step, self.listener.note)
            self.ready.extend(zip(unit, results, strict=True))
        return self.ready.popleft()

    def close(self, interrupted: bool = False) -> None:
        self.trainer.close()


def start(recipe: Recipe, ex: Execution, listener, trials: int = 0) -> Inline | Pool:
    """Slots over every visible GPU (`cuda`), or several on one device (`--workers-per-gpu N`, or by the model's
    size on a GPU, or on the CPU by its size and the `trials` to run, 0 if not known: sizing.cpu_slots); this
    process's main thread when one slot is all there is. The first model is loaded here, before that choice,
    which depends on its size."""
    devices = [ex.device]
    if ex.device == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise MuaError("no CUDA GPU is visible")
        ex = dataclasses.replace(ex, device=devices[0]) if len(devices) == 1 else ex
    first = Trainer.load(recipe, devices[0], listener.note, ex.cuda_graphs, ex.fused_kernels)
    if not devices[0].startswith("cuda"):
        return _cpu(recipe, ex, listener, first, trials)
    # the memory plan, resolved here into explicit settings that every slot then follows
    slots, k = planned(dataclasses.replace(ex, device=devices[0]), recipe, first)
    ex = dataclasses.replace(ex, workers_per_gpu=slots, batch_trials=k)
    first.keep_warm(slots, k)
    if len(devices) == 1 and slots == 1:
        return Inline(recipe, ex, listener, first)
    return Pool.start(recipe, ex, listener, devices, first)  # which closes `first` if it cannot start


def _cpu(recipe: Recipe, ex: Execution, listener, first: Trainer, trials: int) -> Inline | Pool:
    """One slot: this process's main thread, with every thread torch has. More: this process and slot processes,
    the cores shared out among them as torch threads; this process's are given back on close."""
    import torch

    keep_freed_memory()
    slots = cpu_slots(ex, recipe, first.n_params, trials)
    if slots == 1:
        first.keep_warm(1, trials_per_pass(ex, recipe, first.n_params))  # memory.warm_capacity: none by default
        return Inline(recipe, ex, listener, first)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // slots))  # this process's, and each slot process's (pool.slot_process)
    try:
        return Pool.start(recipe, dataclasses.replace(ex, workers_per_gpu=slots), listener, ["cpu"], first,
                          after_close=lambda: torch.set_num_threads(before))  # fmt: skip
    except BaseException:
        torch.set_num_threads(before)
        raise
