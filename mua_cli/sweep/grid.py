"""Which learning rates a sweep runs: the planned grid per (regime, rank, seed), one more power of 2 where an
optimum sits at the grid's edge, and half-octave LRs around each interior optimum. Decisions only: each is a
function of the trials finished so far, so a resumed sweep makes the same ones."""

from __future__ import annotations

import hashlib
import json
import math

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


def plan(recipe: Recipe) -> list[TrialSpec]:
    lrs = parse_lrs(recipe.sweep.lrs)
    return [
        make_spec(recipe, reg, rank, lr, seed)
        for reg, rank in groups(recipe)
        for lr in lrs
        for seed in range(recipe.sweep.seeds)
    ]


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
