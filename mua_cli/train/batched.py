"""K LoRA trials that differ only in LR, trained side by side in one model (stacked.py) by loop.py's loop: a
unit of work built once (`Batched`) and, where a sweep keeps it (warm.py), reset in place for the next unit of
its shape instead of being built, warmed up and captured again."""

from __future__ import annotations

import math
import time

import torch

from .. import accel
from ..science.theory import get_regime
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .adapters import lora_draws
from .loop import Trainer, bf16_autocast, clone_batch, copy_batch, failed_results, finish, phases, set_eval, train_steps
from .stacked import NotBatchable, StackedAdamW, build, evaluate_stacked, per_trial_loss, repeat
from .tasks import as_task
from .warm import WarmUnits


def run_batched(
    specs: list[TrialSpec],
    base: torch.nn.Module,
    task,
    recipe: Recipe,
    device: str = "cpu",
    on_step=None,
    graphs: bool = True,
    on_note=None,
    warm: WarmUnits | None = None,
) -> list[TrialResult]:
    """Train trials that differ only in LR together (stacked.py); any error fails them all (with the error).
    `warm`: where a built unit of this shape may be taken from, and is given back to after (warm.py)."""
    t0 = time.perf_counter()
    try:
        return _train_batched(specs, base, task, recipe, device, on_step, t0, graphs, on_note, warm)
    except (KeyboardInterrupt, SystemExit, torch.cuda.OutOfMemoryError, NotBatchable):
        raise  # the caller splits the group and tries again, or runs its trials one by one
    except Exception as e:
        return failed_results(e, len(specs), device, t0)


def _train_batched(specs, base, task, recipe, device, on_step, t0, graphs, on_note, warm) -> list[TrialResult]:
    first, task, o = specs[0], as_task(task), recipe.optim
    if any((s.regime, s.rank, s.seed) != (first.regime, first.rank, first.seed) for s in specs):
        raise ValueError("batched trials must share regime, rank and seed")
    if not task.fixed_shape:
        raise NotBatchable("the task's batches change shape")
    k = len(specs)
    shape = Batched.shape(first, k, graphs)
    # what the cache held when this unit asked: why a unit of a shape seen before was built again
    kept = {"kept_idle": len(warm), "kept_freed": warm.freed} if warm is not None else {}
    unit = warm.take(shape) if warm is not None else None
    reused = unit is not None
    try:
        unit = unit or Batched(base, first, task, recipe, k, device, graphs)
        unit.reset(specs, on_note)
        clock = {"ready_at": time.perf_counter()}
        curves = train_steps(unit.trainer, o, task.train_batches(first.seed, o.steps, o.batch_size, device), device,
                             on_step, on_note, clock, unit.step)  # fmt: skip
        clock["steps_at"] = time.perf_counter()
        results = [finish(c, o, device) for c in curves]
        if o.metric == "eval" or recipe.data.eval_fraction > 0:
            scores = evaluate_stacked(unit.model, task, o.batch_size, k, device)
            for i, r in enumerate(results):
                if r.status == "ok":
                    set_eval(r, float(scores["loss"][i]), o)
                    if "accuracy" in scores:
                        r.info["eval_accuracy"] = float(scores["accuracy"][i])
    except BaseException:
        if unit is not None:
            unit.close()  # a unit cut off mid-way holds a half-trained state: never kept
        raise
    wall = (time.perf_counter() - t0) / k
    spent = phases(t0, clock)  # the unit's, not divided among its trials
    dtype = str(next(base.parameters()).dtype).replace("torch.", "")
    for r in results:
        r.wall_time = wall
        r.info = {**r.info, "task": task.kind, "trainable_params": unit.n_params, "batched_with": k,
                  "phases_s": spent, "base_dtype": dtype, **kept}  # fmt: skip
        if reused:
            r.info["warm_unit"] = True
    if warm is not None:
        warm.give(shape, unit)
    else:
        unit.close()
    return results


class Batched:
    """K trials of one (regime, rank) in one model (stacked.py), each with its own LR, clip and divergence stop
    (a stopped trial's LR is 0), built once and trained unit after unit: `reset` readies it for the next unit's
    K LRs and seed in place, so that every tensor its step reads keeps its address and a captured CUDA graph of
    the step stays valid (warm.py)."""

    def __init__(self, base, first: TrialSpec, task, recipe: Recipe, k: int, device: str, graphs: bool):
        o = recipe.optim
        self.regime, self.rank = get_regime(first.regime), first.rank
        model, params, head_params = build(base, first, recipe, k)
        model.to(device).train()
        accel.prepare(model, device, task.unpadded, recipe.data.seq_len)
        self.model, self.params, self.head_params = model, params, head_params
        self.n_params = sum(p[0].numel() for p in params + head_params)
        # each seed's init, one trial's slice per weight, on the device: a reset copies it into every trial
        self.inits = {first.seed: [p[0].detach().clone() for p in params]}
        self.head_init = [p.detach().clone() for p in head_params]
        self.used = False
        self.opt = opt = StackedAdamW([params, head_params], o)
        autocast = bf16_autocast(device)
        # What a captured step reads and writes lives as long as this object (accel/graphed.py)
        batch: dict = {}
        # The closures below read locals, never self: a cycle through self would keep the unit's K models and
        # its graph's memory alive until the garbage collector's next full pass, long after close()
        self.peak = peak = torch.zeros(k, device=device)
        lr = torch.zeros(k, device=device)
        head_lr = torch.zeros(k, device=device)
        loss_out = torch.zeros(k, device=device)
        self.alive = alive = torch.ones(k, dtype=torch.bool, device=device)
        self.start = start = torch.full((k,), math.nan, device=device)  # each trial's first loss, set by step 1

        def set_lr(factor: float) -> None:
            lr.copy_(peak * factor)
            head_lr.fill_(o.head_lr * factor)

        def load(b) -> None:
            if "x" in batch:
                copy_batch(batch["x"], repeat(b, k))
            else:
                batch["x"] = clone_batch(repeat(b, k))

        def one_step() -> None:
            with autocast:
                loss = per_trial_loss(task, model, batch["x"], k)
            loss_out.copy_(loss.detach())
            start.copy_(torch.where(start.isnan(), loss_out, start))
            alive.logical_and_(torch.isfinite(loss_out) & (loss_out <= o.divergence_factor * start))
            # torch.where, not a product: a stopped trial's NaN × 0 would still be NaN
            torch.where(alive, loss, torch.zeros_like(loss)).sum().backward()
            opt.step([lr * alive, head_lr * alive], alive)

        self.trainer = Trainer(model, opt.params, k, one_step, loss_out, set_lr, load, graphs)
        self.step = accel.step(one_step, model, device, graphs)

    @staticmethod
    def shape(first: TrialSpec, k: int, graphs: bool) -> tuple:
        """What a kept unit must match to be reused (the seed and LRs are reset). Units are kept per trainer, so
        the recipe, task and base are those it was built with."""
        return first.regime, first.rank, k, graphs

    @torch.no_grad()
    def reset(self, specs: list[TrialSpec], on_note=None) -> None:
        """Ready for `specs`: their LRs; and, after a unit has trained, their seed's init, the head's starting
        weights and fresh optimizer state (what a newly built unit has)."""
        self.peak.copy_(torch.tensor([s.lr for s in specs], dtype=torch.float32))
        self.step.on_note = on_note
        if not self.used:
            self.used = True
            return
        seed = specs[0].seed
        if seed not in self.inits:
            draws = [t for _, a, b in lora_draws(self.model, self.regime, self.rank, seed) for t in (a, b)]
            self.inits[seed] = [d.to(p.device, p.dtype) for d, p in zip(draws, self.params, strict=True)]
        for p, init in zip(self.params, self.inits[seed], strict=True):
            p.copy_(init)  # broadcast over the K trials
        for p, init in zip(self.head_params, self.head_init, strict=True):
            p.copy_(init)
        for m in (*self.opt.m, *self.opt.v, self.opt.t):
            m.zero_()
        self.alive.fill_(True)
        self.start.fill_(math.nan)

    def close(self) -> None:
        """Frees the captured graph's memory pool (the model goes with the last reference)."""
        self.step.close()
