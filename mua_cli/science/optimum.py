"""η* of one (regime, rank) group from every LR and seed near its best grid point. numpy/scipy only.

The model, in x = log2(lr) near the optimum x*:

    loss(x, seed) = c_seed + a · (x − x*)²        for x ≤ x*
                  = c_seed + a · ρ · (x − x*)²    for x > x*

Each seed gets its own level c_seed (seeds shift the whole curve), the two sides their own curvature
(ρ ∈ [1/RHO_MAX, RHO_MAX]: the loss usually rises faster above the optimum than below it), and a ≥ 0.
For fixed (x*, ρ) the model is linear in (c_seed, a), so the residual sum of squares RSS(x*) is profiled
exactly on a fine grid of x*. The points are those within WINDOW octaves of the best grid LR (and at least two
LRs a side): far from the optimum the loss is no parabola. The 95 % interval is the likelihood-ratio set
{x*: (RSS(x*) − RSS_min) / σ² ≤ F(1, dof)}, with σ² the group's own residual variance shrunk toward the run's
pooled one (`pool_noise`, `interval`), so a group with one seed borrows its noise level from the other groups
instead of guessing it from one degree of freedom. A diverged LR is censored, not dropped: it bounds x* (and
so the interval) from above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WINDOW = 1.5  # octaves either side of the best grid LR: the quadratic model holds near the optimum only
RHO_MAX = 4.0  # the curvature of one side is at most this × the other's
STEP = 0.01  # resolution of the x* profile, in octaves
_RHOS = np.exp(np.linspace(-math.log(RHO_MAX), math.log(RHO_MAX), 25))


@dataclass
class LocalFit:
    """A group's profile: RSS over candidate x*, before the noise level is known."""

    grid: np.ndarray  # candidate x* (log2 lr)
    rss: np.ndarray  # min over ρ of the residual sum of squares; inf where censored
    n: int  # finite points in the window
    n_seeds: int
    neighbours: tuple[float, float]  # the grid points either side of the best

    @property
    def dof(self) -> int:
        """Residual degrees of freedom: points less the seed levels, x*, a and ρ."""
        return max(self.n - self.n_seeds - 3, 0)

    @property
    def rss_min(self) -> float:
        return float(np.min(self.rss))

    @property
    def x_star(self) -> float:
        return float(self.grid[int(np.argmin(self.rss))])

    @property
    def curved(self) -> bool:
        """False when a flat line fits as well as any parabola: the data hold no optimum."""
        return bool(np.isfinite(self.rss).any()) and self.rss_min < float(np.max(self.rss[np.isfinite(self.rss)]))


def seed_adjusted(x: np.ndarray, y: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """`y` with each seed's level moved onto the best-covered seed's, over the LRs they share.

    Seeds shift a whole loss curve; a seed run at a few LRs only (a refinement's extra seed) would otherwise
    pull those LRs' means up or down, and with them the choice of the best grid point."""
    out = y.astype(float).copy()
    if not len(out):
        return out
    seeds, counts = np.unique(seed, return_counts=True)
    ref = seeds[np.argmax(counts)]
    ref_y = {xv: yv for xv, yv, s in zip(x, y, seed, strict=True) if s == ref}
    for s in seeds:
        if s == ref:
            continue
        mine = seed == s
        shared = [yv - ref_y[xv] for xv, yv in zip(x[mine], y[mine], strict=True) if xv in ref_y]
        if shared:
            out[mine] -= float(np.mean(shared))
    return out


def window(levels: np.ndarray, x_best: float) -> tuple[float, float]:
    """The span (log2) of the points the local fit reads around the best LR `x_best`, given the LRs `levels`
    (log2) that have a finite loss: WINDOW octaves each side, and at least two LRs each side where there are."""
    levels = np.unique(np.asarray(levels, float))
    below, above = levels[levels < x_best][::-1], levels[levels > x_best]
    lo_edge = min(x_best - WINDOW, below[1] if len(below) > 1 else x_best)
    hi_edge = max(x_best + WINDOW, above[1] if len(above) > 1 else x_best)
    return float(lo_edge), float(hi_edge)


def near_best(x: np.ndarray, y: np.ndarray, seed: np.ndarray) -> tuple[float, np.ndarray]:
    """The best LR (log2; by seed-adjusted means) of finite points (x, y, seed), and which points lie in its
    window: those the local fit reads."""
    adj = seed_adjusted(x, y, seed)
    means = {v: adj[x == v].mean() for v in np.unique(x)}
    x_best = min(means, key=means.get)
    lo_edge, hi_edge = window(np.unique(x), x_best)
    return float(x_best), (x >= lo_edge - 1e-9) & (x <= hi_edge + 1e-9)


def profile(x: np.ndarray, y: np.ndarray, seed: np.ndarray, diverged_x: np.ndarray, grid_span) -> LocalFit | None:
    """Profile RSS(x*) for finite points (x, y, seed) and diverged LRs `diverged_x` (log2).

    `grid_span` is (lowest, highest) LR tried, log2: x* is searched inside it and within WINDOW of the best
    finite point. Returns None when fewer than 3 distinct LRs are finite in the window.
    """
    order = np.argsort(x, kind="stable")
    x, y, seed = x[order], y[order], seed[order]
    x_best, keep = near_best(x, y, seed)
    lo_edge, hi_edge = window(np.unique(x), x_best)
    x, y, seed = x[keep], y[keep], seed[keep]
    levels = np.unique(x)
    if len(levels) < 3:
        return None
    lo = max(float(grid_span[0]), lo_edge)
    hi = min(float(grid_span[1]), hi_edge)
    cand = np.round(np.arange(lo, hi + STEP / 2, STEP), 9)
    below, above = levels[levels < x_best], levels[levels > x_best]
    neighbours = (float(below[-1]) if len(below) else x_best, float(above[0]) if len(above) else x_best)

    # Demean within seed: the seed levels c_seed drop out and only the curvature a is left to solve.
    seeds, inv = np.unique(seed, return_inverse=True)
    counts = np.bincount(inv)
    yc = y - (np.bincount(inv, y) / counts)[inv]
    d = x[None, :] - cand[:, None]  # (G, n)
    left, right = np.where(d < 0, d, 0.0) ** 2, np.where(d > 0, d, 0.0) ** 2
    f = left[:, None, :] + _RHOS[None, :, None] * right[:, None, :]  # (G, R, n)
    onehot = np.eye(len(seeds))[inv]  # (n, seeds)
    fc = f - ((f @ onehot) / counts) @ onehot.T
    fy, ff = fc @ yc, np.einsum("grn,grn->gr", fc, fc)
    a = np.where(ff > 0, np.maximum(fy, 0.0) / np.where(ff > 0, ff, 1.0), 0.0)

    rss = np.maximum(float(yc @ yc) - a * fy, 0.0)
    # Censoring: a diverged LR above the best is no optimum and bounds x* from above. Nothing more is
    # assumed: divergence is a cliff, and the parabola's continuation past the data need not reach it.
    above = diverged_x[diverged_x > x_best]
    if len(above):
        rss[cand >= above.min()] = np.inf
    best = rss.min(axis=1)
    return LocalFit(cand, best, len(x), len(seeds), neighbours)


def pool_noise(fits: list[LocalFit]) -> tuple[float | None, int]:
    """The run's residual variance σ² and its degrees of freedom, pooled over groups that have any."""
    dof = sum(f.dof for f in fits)
    if dof == 0:
        return None, 0
    return sum(f.rss_min for f in fits if f.dof) / dof, dof


POOL_DOF = 4.0  # how many residual degrees of freedom the run's pooled σ² counts for in a group's own σ²


def interval(fit: LocalFit, sigma2: float, dof: int) -> tuple[float, float]:
    """95 % likelihood-ratio interval for x*: every x* whose RSS is within σ²·F(1, ·) of the minimum.

    σ² is the group's own residual variance shrunk toward the run's pooled σ² (which counts as POOL_DOF
    degrees of freedom): a group whose curve the model fits worse than the others gets a wider interval, and
    a group with no residual degrees of freedom of its own borrows the pool's."""
    from scipy import special  # where intervals are computed: reading a saved fit needs no SciPy

    k = min(POOL_DOF, dof)
    own = (fit.rss_min + k * sigma2) / (fit.dof + k) if fit.dof + k > 0 else sigma2
    thresh = fit.rss_min + max(own, 1e-12) * float(special.fdtri(1, fit.dof + k, 0.95))
    inside = fit.grid[fit.rss <= thresh]
    return float(inside.min()), float(inside.max())
