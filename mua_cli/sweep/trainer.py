"""Trains on one device: the base model and the data loaded once (`Trainer.load`), then one unit of work after another
(a unit is one trial, or several LoRA trials that differ only in LR and train side by side: train/stacked.py).

Out of GPU memory is never a trial's result. A unit that runs out while built units are kept (train/warm.py)
frees them and runs again whole; a unit that runs out otherwise is split in halves until single trials remain;
a single trial then runs with eager steps (no graph pool), then with the GPU to itself (the other slots on it
wait), then eagerly with the GPU to itself. Only a trial that fits in none of these is stored as failed,
with what would fit.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ..accel.fused import fuse
from ..accel.graphed import empty_cache
from ..errors import MuaError
from ..science.theory import FULL
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from ..train.batched import run_batched
from ..train.loop import run_trial
from ..train.stacked import NotBatchable, can_batch
from ..train.warm import WarmUnits
from ..train.workload import load_workload


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MuaError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise MuaError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda:"):
        index, n = device[5:], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= n:
            raise MuaError(f"--device {device}: this machine has GPUs cuda:0 … cuda:{n - 1}")
    return device


class GpuShare:
    """The slots of one GPU run units side by side; a trial that ran out of memory can have the GPU alone.
    A readers-writer lock: `shared()` for every unit, `alone()` waits until no unit runs and keeps new ones out."""

    def __init__(self):
        self.cond = threading.Condition()
        self.running, self.waiting, self.exclusive = 0, 0, False

    @contextmanager
    def shared(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.exclusive and not self.waiting)
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    @contextmanager
    def alone(self):
        with self.cond:
            self.waiting += 1
            self.cond.wait_for(lambda: not self.running and not self.exclusive)
            self.waiting -= 1
            self.exclusive = True
        try:
            yield
        finally:
            with self.cond:
                self.exclusive = False
                self.cond.notify_all()


_SHARES: dict[str, GpuShare] = {}
_SHARES_LOCK = threading.Lock()


def gpu_share(device: str) -> GpuShare:
    key = str(torch.device(device).index or 0) if device.startswith("cuda") else device
    with _SHARES_LOCK:
        return _SHARES.setdefault(key, GpuShare())


# What torch raises in a slot when a CUDA call of its own meets another slot's graph capture on the same GPU
# (how often it was seen: docs/performance.md): the trial is sound, its moment was not. Seen while captures drew
# streams that could be a slot's own (accel/graphed.side_stream); kept for whatever else may still clash.
CAPTURE_CLASH = ("during CUDA graph capture", "during capturing stage")


def clashed(result: TrialResult) -> bool:
    return result.status == "failed" and any(m in (result.error or "") for m in CAPTURE_CLASH)


# CUDA errors after which the process's context on that GPU is unusable: every later call fails as well
BROKEN = ("device-side assert triggered", "an illegal memory access", "unspecified launch failure",
          "an illegal instruction", "misaligned address")  # fmt: skip


def broken(result: TrialResult) -> str | None:
    """The error's first line where a trial failed with a CUDA error that breaks the GPU for this process."""
    error = result.error or ""
    return error.splitlines()[0] if result.status == "failed" and any(m in error for m in BROKEN) else None


class Callbacks(NamedTuple):
    """One unit's: `on_step(step, loss)` as it trains (raising there stops it), `on_note(message)`."""

    on_step: Callable[[int, float], None] | None
    on_note: Callable[[str], None] | None


class Trainer:
    """One device's workload, loaded once, and the units it trains. `on_note`: where what it does besides
    training is said; each unit gets its own callbacks (a slot's thread routes them to the main thread)."""

    freed_kept = False  # the last attempt ran out of memory while kept units held some, and freed them

    def __init__(self, recipe: Recipe, device: str, base, data, notes, graphs: bool, on_note=None, unfuse=None):
        self.recipe, self.device, self.graphs, self.on_note = recipe, device, graphs, on_note
        self.base, self.data, self.notes = base, data, notes  # data: a task (tasks.py)
        self._unfuse = unfuse or (lambda: None)
        self.share = gpu_share(device)
        self.batchable = True  # until a unit finds a part of the model that trials cannot share (train/stacked.py)
        self.warm = WarmUnits()  # built units kept for the next of their shape: none until keep_warm
        self._unit_bytes: dict[tuple, int] = {}
        self._room_for: dict[tuple, int] = {}  # (slots, K) → memory.warm_capacity, worked out once
        self._keeping = False

    @classmethod
    def load(cls, recipe: Recipe, device: str, on_note=None, graphs: bool = True, fused: bool = True) -> Trainer:
        """Loads the recipe's workload onto `device` (the base once, not per trial: each trial's copy is then made
        there), and fuses its kernels where asked (each trial's model, a copy of the base, inherits them)."""
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)  # CUDA graphs and streams are made on the current device
        work = load_workload(recipe, device, on_note=on_note)
        work.base.requires_grad_(False)
        if device.startswith("cuda"):
            work.base.to(device)
        unfuse = fuse(work.base, device, on_note) if fused else None
        return cls(recipe, device, work.base, work.task, work.notes, graphs, on_note, unfuse)

    def close(self) -> None:
        """Frees the kept units, then undoes what fusing the kernels changed beyond this trainer's models
        (fused.py)."""
        self.warm.clear()
        self._unfuse()

    def keep_warm(self, slots: int, k: int, shared: WarmUnits | None = None) -> WarmUnits:
        """Keeps built units between units (train/warm.py), as many as the memory plan leaves room for beside
        `slots` running units of up to `k` trials on this device (memory.warm_capacity); `shared`: the kept
        units of another slot on the same device, used by both."""
        self.warm = shared if shared is not None else WarmUnits(self._room(slots, k), self._bytes)
        self._keeping = shared is None  # the trainer that made the cache sizes it (size_kept)
        return self.warm

    def size_kept(self, slots: int, k: int) -> None:
        """Bounds the kept units by the room beside `slots` running units of up to `k` trials: the largest the
        sweep has queued or running now, which is often less than the plan's (a later round's units are small),
        so more units are kept; a larger unit queued shrinks the room before it is built (WarmUnits.resize)."""
        if self._keeping:  # not another slot's cache, nor one keep_warm never set up, whose units have no size
            self.warm.resize(self._room(slots, k))

    def _room(self, slots: int, k: int) -> int:
        from .memory import warm_capacity

        if (slots, k) not in self._room_for:
            self._room_for[slots, k] = warm_capacity(self, slots, k)
        return self._room_for[slots, k]

    def _bytes(self, shape: tuple) -> int:
        """A kept unit's memory by the estimate (shape: train/batched.py's Batched.shape)."""
        _, rank, k, _ = shape
        if (rank, k) not in self._unit_bytes:
            self._unit_bytes[rank, k] = self.memory(rank).unit(k)
        return self._unit_bytes[rank, k]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    @property
    def has_dropout(self) -> bool:
        """Whether training draws random numbers (dropout, attention dropout): on a GPU those draws advance one
        generator that a CUDA graph being captured by another thread owns at that moment."""
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.base.modules()):
            return True
        cfg = getattr(self.base, "config", None)
        values = cfg.to_dict().items() if cfg is not None else ()
        return any("dropout" in k and isinstance(v, float) and v > 0 for k, v in values)

    def memory(self, rank: int | None):
        """The estimate of one trial's GPU memory at this rank (None: full finetuning); memory.py."""
        from .memory import estimate

        return estimate(self.base, self.data, self.recipe, rank)

    def run(self, spec: TrialSpec, graphs: bool | None = None, on_step=None, on_note=None) -> TrialResult:
        graphs = self.graphs if graphs is None else graphs
        return run_trial(spec, self.base, self.data, self.recipe, self.device, on_step, graphs, on_note)

    def run_unit(self, unit: list[TrialSpec], on_step=None, on_note=None) -> list[TrialResult]:
        """The unit's results, in its order. `on_step(step, loss)`: called as it trains (raising there stops the
        unit: nothing of it is kept); `on_note`: this unit's notes (the trainer's own where None). A CUDA error that
        leaves the GPU unusable to this process (BROKEN) stops the sweep with a MuaError, its unit not stored."""
        started = time.time()
        results = self._run_unit(unit, Callbacks(on_step, on_note or self.on_note))
        finished = time.time()
        if error := next(filter(None, map(broken, results)), None):  # none of the unit is stored: it runs on resume
            raise MuaError(f"{self.device}: {error}. This process cannot use the GPU any more; the trials stored "
                           "so far are kept: run the same command again to resume")  # fmt: skip
        for r in results:  # when it ran: a trial that rode along may be stored long after (stream.py)
            r.info["started_at"], r.info["finished_at"] = round(started, 3), round(finished, 3)
        if self.device.startswith("cuda"):  # the GPU's high-water mark so far (every slot on it), stored with the trial
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            for r in results:
                r.info["peak_memory_gib"] = round(peak, 2)
        return results

    def _run_unit(self, unit: list[TrialSpec], cb: Callbacks) -> list[TrialResult]:
        if len(unit) > 1 and not self.batchable:
            return [r for spec in unit for r in self._run_unit([spec], cb)]
        out = self._attempt(unit, self.graphs, False, cb)
        if out is None and self.freed_kept:  # kept units held memory when it ran out: whole again, without them
            out = self._attempt(unit, self.graphs, False, cb)
            for r in out or []:  # recorded: every later unit of a shape seen before is built again
                r.info["ran_out_beside_kept"] = True
        if out is not None and self.device.startswith("cuda") and any(map(clashed, out)):
            if cb.on_note:
                cb.on_note(f"{unit[0].label}: a CUDA call met another slot's graph capture; it ran again with the "
                           "GPU to itself")  # fmt: skip
            out = self._attempt(unit, self.graphs, True, cb)
        if out is not None:
            return out
        if len(unit) > 1:
            half = len(unit) // 2
            return self._run_unit(unit[:half], cb) + self._run_unit(unit[half:], cb)
        tries = [(False, False), (True, True), (True, False)] if self.graphs else [(True, False)]
        for alone, graphs in tries:
            out = self._attempt(unit, graphs, alone, cb)
            if out is not None:
                how = "eager steps" if not graphs else "CUDA graphs"
                if cb.on_note:
                    cb.on_note(f"{unit[0].label} ran out of GPU memory; it ran again with {how}"
                               + (", the GPU to itself" if alone else ""))  # fmt: skip
                return out
        return [self._too_big(unit[0])]

    def _attempt(self, unit: list[TrialSpec], graphs: bool, alone: bool, cb: Callbacks) -> list[TrialResult] | None:
        """The unit's results, or None if it ran out of GPU memory (its memory freed before returning) or cannot
        be batched."""
        oom = self.freed_kept = False
        with self.share.alone() if alone else self.share.shared():
            try:
                if len(unit) == 1 and not self._keeps(unit[0]):
                    return [self.run(unit[0], graphs, cb.on_step, cb.on_note)]
                return run_batched(unit, self.base, self.data, self.recipe, self.device, cb.on_step, graphs,
                                   cb.on_note, self.warm)  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                oom = True
            except NotBatchable as e:
                self.batchable = False
                if cb.on_note:
                    cb.on_note(f"LoRA trials run one by one: {e}")
                if len(unit) > 1:
                    return None
        if not oom:  # a lone trial that the batched path turned away: now it runs on its own
            return self._attempt(unit, graphs, alone, cb)
        self.freed_kept = len(self.warm) > 0
        # out of the except block: the failed step's frames, and the tensors they hold, are gone
        self.warm.clear()  # the kept units' memory goes first
        gc.collect()
        empty_cache()
        return None

    def _keeps(self, spec: TrialSpec) -> bool:
        """Whether a one-trial unit runs as a batched unit of one, which is kept and reused (a GPU keeps built
        units: memory.warm_capacity) instead of being built, warmed up and captured again, as a trial run on
        its own is each time. A batched trial trains what it would alone, up to rounding (train/stacked.py)."""
        return self.warm.capacity > 0 and self.batchable and can_batch(spec, self.recipe)

    def _too_big(self, spec: TrialSpec) -> TrialResult:
        from .memory import usable_bytes, what_fits

        t = self
        mem = t.memory(None if spec.regime == FULL else spec.rank)
        usable = usable_bytes(t.device)
        held = torch.cuda.memory_allocated(t.device) / 2**30
        cached = torch.cuda.memory_reserved(t.device) / 2**30 - held  # graphs' pools, other streams' cache
        error = (f"OutOfMemoryError: one trial alone does not fit on {t.device}, eager or graphed, with the GPU "
                 f"to itself ({mem.describe(1)} estimated, {usable / 2**30:.1f} GiB usable, {held:.2f} GiB held "
                 f"by this process's models, {cached:.2f} GiB more reserved); "
                 f"{what_fits(mem, usable, t.recipe.optim.batch_size)}")  # fmt: skip
        return TrialResult("failed", math.nan, device=t.device, error=error)
