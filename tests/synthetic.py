"""Synthetic sweeps with a known truth: η*(r) = 2^log2c · r^slope per regime, asymmetric loss curves, noise.

loss(x) = 2 + seed_shift + curv · d²         (d = x − x* ≤ 0)
        = 2 + seed_shift + curv · asym · d²  (d > 0; asym > 1: the loss rises faster above the optimum)
with x = log2 lr, plus Gaussian noise; LRs at or above x* + diverge_gap are diverged.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

LOG2C = -8.3  # off the grid, so the estimator has work to do
RECIPE = {
    "model": "embedded:tiny",
    "alpha0": 1.0,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "warmup_frac": 0.05,
    "min_lr_ratio": 0.1,
}


def truth(log2c: float, slope: float, rank: int) -> float:
    return log2c + slope * math.log2(rank)


def trials(
    spec: dict[str, float],
    ranks=(4, 16, 64, 256),
    seeds=(0,),
    grid=None,
    noise: float = 0.0,
    curv: float = 0.05,
    asym: float = 1.0,
    seed_shift: float = 0.0,
    diverge_gap: float | None = None,
    full_log2: float | None = None,
    rng: int = 0,
    log2c: float = LOG2C,
    jitter: float = 0.0,
) -> pd.DataFrame:
    """One row per trial. spec: regime → true slope. `jitter`: each rank's x* moves off the power law by
    N(0, jitter²) (the scatter τ a real sweep has). `grid` defaults to every integer log2 lr in −20..3."""
    gen = np.random.default_rng(rng)
    grid = np.arange(-20, 4) if grid is None else np.asarray(list(grid), float)
    groups = [(reg, r, truth(log2c, s, r) + jitter * gen.standard_normal()) for reg, s in spec.items() for r in ranks]
    if full_log2 is not None:
        groups.append(("full", 0, full_log2))
    rows = []
    for reg, r, xs in groups:
        for seed in seeds:
            shift = seed_shift * gen.standard_normal()
            for x in grid:
                d = x - xs
                loss = 2.0 + shift + curv * d * d * (asym if d > 0 else 1.0) + noise * gen.standard_normal()
                div = diverge_gap is not None and d >= diverge_gap
                rows.append(
                    {"regime": reg, "rank": r, "lr": 2.0**x, "seed": seed,
                     "status": "diverged" if div else "ok", "metric": math.inf if div else loss,
                     "steps": 100, "batch_size": 8, "seq_len": 64, "recipe": dict(RECIPE), "x_true": xs}
                )  # fmt: skip
    return pd.DataFrame(rows)
