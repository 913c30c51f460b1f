"""Which learning rates a sweep runs: every other LR of the planned grid per (regime, rank, seed) first, then the
grid's LRs the local fit reads around each group's best, one more power of 2 where an optimum sits at the grid's
edge, and half-octave LRs around each interior optimum. Decisions only: each is a function of the trials
finished so far, so a resumed sweep makes the same ones."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from ..science.optimum import window
from ..science.theory import FULL, parse_lrs, parse_regimes
from ..spec.recipe import Recipe
from ..spec.trial import TrialSpec

GROW_FACTOR = 2.0  # grids are powers of 2; an extension adds the next power beyond the edge


def trial_key(recipe: Recipe, regime: str, rank: int, lr: float, seed: int) -> str:
    blob = json.dumps(
        {"recipe": recipe.outcome_fields(), "regime": regime, "rank": rank, "lr": f"{lr:.12g}", "seed": seed},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def make_spec(recipe: Recipe, regime: str, rank: int, lr: float, seed: int) -> TrialSpec:
    return TrialSpec(regime, rank, lr, seed, trial_key(recipe, regime, rank, lr, seed))


def groups(recipe: Recipe) -> list[tuple[str, int]]:
    """The (regime, rank) pairs the sweep covers; full finetuning is the pair ("full", 0)."""
    out = [(reg.name, r) for reg in parse_regimes(recipe.sweep.regimes) for r in recipe.lora_ranks]
    if recipe.wants_full:
        out.append((FULL, 0))
    return out


COARSE_MIN = 6  # a shorter grid runs whole: every other LR of it would save a trial or none, for one more round
COARSE_STEP = 1.0  # octaves between neighbouring LRs at most: every other LR of a sparser grid steps too far


def coarse(lrs: list[float]) -> list[float]:
    """Every other LR of a sorted grid, from its second: the first round. `fill` adds the rest where the fit
    reads them; a grid's ends are usually margins no window reaches. A short or sparse grid runs whole."""
    steps = [math.log2(b / a) for a, b in zip(lrs, lrs[1:], strict=False)]
    if len(lrs) < COARSE_MIN or max(steps) > COARSE_STEP + 1e-9:
        return list(lrs)
    return list(lrs[1::2])


def plan(recipe: Recipe) -> list[TrialSpec]:
    """The first round: with `refine` (the default) every other LR of the grid (`coarse`), else the whole grid
    (`grid_plan`). Far from an optimum the fit reads nothing, and there an LR every two octaves finds where the
    optimum is; `fill` then adds the grid's LRs the fit reads around it."""
    lrs = parse_lrs(recipe.sweep.lrs)
    return _specs(recipe, coarse(lrs) if recipe.sweep.refine else lrs)


def grid_plan(recipe: Recipe) -> list[TrialSpec]:
    """Every trial of the grid, as a sweep with `refine: 0` runs it."""
    return _specs(recipe, parse_lrs(recipe.sweep.lrs))


def _specs(recipe: Recipe, lrs: list[float]) -> list[TrialSpec]:
    return [
        make_spec(recipe, reg, rank, lr, seed)
        for reg, rank in groups(recipe)
        for lr in lrs
        for seed in range(recipe.sweep.seeds)
    ]


def _has(lrs, lr: float) -> bool:
    return any(abs(math.log2(lr / t)) < 1e-6 for t in lrs)


def fill(lrs_metrics: dict[float, list[float]], base_grid: list[float], refine: bool) -> list[float]:
    """The grid's LRs not yet run that the local fit around the current best would read were the whole grid run:
    those inside its window (optimum.window, counting every grid LR not run as one that may be read), and where
    nothing run reaches an edge of the window, the nearest grid LR beyond it (the fit looks for η* between the
    lowest and highest LR run only). With `refine`, the half-octave LRs that refinement will add around the
    best count as LRs of the window, and the edges wait until they are in: the best may move to one of them."""
    means = {lr: sum(v) / len(v) for lr, v in lrs_metrics.items() if v}
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    if not finite:
        return []  # everything diverged: the extension looks lower
    best = min(finite, key=finite.get)
    missing = [lr for lr in base_grid if not _has(means, lr)]
    ahead = refinement(lrs_metrics) if refine else []
    lo, hi = window(np.log2([*finite, *missing, *ahead]), math.log2(best))
    x = {lr: math.log2(lr) for lr in missing}
    out = [lr for lr in missing if lo - 1e-9 <= x[lr] <= hi + 1e-9]
    if ahead:
        return out
    reach = [*map(math.log2, means), *(x[lr] for lr in out)]
    if min(reach) > lo + 1e-9 and (below := [lr for lr in missing if x[lr] < lo - 1e-9]):
        out.append(max(below))
    if max(reach) < hi - 1e-9 and (above := [lr for lr in missing if x[lr] > hi + 1e-9]):
        out.append(min(above))
    return sorted(out)


def extension(
    lrs_metrics: dict[float, list[float]], base_grid: list[float], max_extend: int
) -> tuple[float | None, str]:
    """The next LR to add for one (regime, rank), or None with the reason there is none.

    Diverged trials count as +inf: they bound the optimum from above. The number of extensions
    so far is read off the grid itself, so a resumed sweep continues where it stopped.
    """
    means = {lr: sum(v) / len(v) for lr, v in lrs_metrics.items() if v}
    if len(means) < 2:
        return None, "no finished trials"
    grid = sorted(means)
    extended = sum(1 for lr in grid if lr < min(base_grid) * 0.999 or lr > max(base_grid) * 1.001)
    finite = [lr for lr in grid if math.isfinite(means[lr])]
    if not finite:
        edge, new = "low", grid[0] / GROW_FACTOR  # everything diverged: look lower
    else:
        best = min(finite, key=lambda lr: means[lr])
        if best == grid[0]:
            edge, new = "low", grid[0] / GROW_FACTOR
        elif best == grid[-1]:
            edge, new = "high", grid[-1] * GROW_FACTOR
        else:
            return None, "interior"
    if extended >= max_extend:
        return None, f"still best at the {edge} edge after {extended} extension(s)"
    return new, edge


def refinement(lrs_metrics: dict[float, list[float]]) -> list[float]:
    """Half-octave LRs either side of an interior best grid point that the grid lacks there.

    A power-of-2 grid puts one point per octave near the optimum; the local fit (optimum.py) needs a few more
    to estimate the curvature on both sides and the noise, and they cost two LRs per group."""
    means = {lr: sum(v) / len(v) for lr, v in lrs_metrics.items() if v}
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    if len(finite) < 3:
        return []
    grid = sorted(means)
    best = min(finite, key=finite.get)
    if best in (grid[0], grid[-1]):
        return []
    out = []
    for new in (best * 2**-0.5, best * 2**0.5):
        if all(abs(math.log2(new / lr)) > 0.3 for lr in grid):
            out.append(new)
    return out
