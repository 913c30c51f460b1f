"""η* of each (regime, rank) group of a run, from all its trials: RankOptimum, and its estimation with the
noise pooled over the groups (optimum.py fits each group's profile). No torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MuaError
from . import optimum as opt
from .theory import FULL, lr_label

if TYPE_CHECKING:  # pandas only where trials are fitted: a saved fit reads back without it (`mua transfer`)
    import pandas as pd

Z95 = 1.959963984540054


def jsonable(v: Any) -> Any:
    """Plain JSON types; NaN and ±inf become None so `json.dumps(..., allow_nan=False)` succeeds."""
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [jsonable(x) for x in v]
    return v


@dataclass
class RankOptimum:
    """The optimal LR of one (regime, rank) group, or why there is none. LRs in lr units, log2 where named."""

    regime: str
    rank: int  # 0 for full finetuning
    lr_star: float | None = None
    log2_lr_star: float | None = None
    lo: float | None = None  # 95% interval, lr units
    hi: float | None = None
    interval_method: str | None = None  # "profile" (likelihood ratio, pooled noise) | "grid" (neighbours)
    edge: str | None = None  # "low" | "high": the best grid LR sits at that end of the grid
    best_grid_lr: float | None = None
    n_seeds: int = 0
    n_lrs: int = 0
    n_diverged: int = 0
    n_failed: int = 0  # errors, not results: left out (a sweep run again retries them)
    n_trials: int = 0  # every stored trial of the group: finished, diverged and failed
    n_points: int = 0  # finite trials in the local fit
    reason: str | None = None  # why there is no η*
    note: str | None = None
    # per LR: lr, mean_metric (None if diverged), n, n_diverged
    points: list[dict] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.lr_star is not None

    @property
    def se_log2(self) -> float | None:
        """A standard error on log2 η*: the 95% interval's width over 2 × 1.96."""
        if not self.usable:
            return None
        return math.log2(self.hi / self.lo) / (2 * Z95)

    def to_dict(self) -> dict:
        return jsonable({**asdict(self), "usable": self.usable, "se_log2": self.se_log2})


def clean_trials(df: pd.DataFrame) -> pd.DataFrame:
    """Drop failed (or unfinished) rows; a diverged row gets metric +inf, worse than any finite loss."""
    import pandas as pd

    metric = pd.to_numeric(df["metric"], errors="coerce").astype(float).to_numpy()
    status = df["status"].astype(str).str.lower().to_numpy()
    diverged = (status == "diverged") | ((status == "ok") & np.isinf(metric))
    ok = (status == "ok") & np.isfinite(metric)
    out = df.loc[ok | diverged].copy()
    out["metric"] = np.where(diverged, np.inf, metric)[ok | diverged]
    out["diverged"] = diverged[ok | diverged]
    return out


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _local(group: pd.DataFrame) -> tuple[RankOptimum, opt.LocalFit | None]:
    """A group's bookkeeping and, where it has an interior best grid point, its profile."""
    if group.empty:
        raise MuaError("no trials in this group")
    base = RankOptimum(regime=str(group["regime"].iloc[0]), rank=int(group["rank"].iloc[0]))
    d = clean_trials(group)
    base.n_seeds, base.n_lrs = int(d["seed"].nunique()), int(d["lr"].nunique())
    base.n_diverged, base.n_failed, base.n_trials = int(d["diverged"].sum()), len(group) - len(d), len(group)
    if d.empty:
        base.reason = "every trial failed"
        return base, None
    lrs = np.sort(d["lr"].unique().astype(float))
    xs = np.log2(lrs)
    span = f"{lr_label(lrs[0])}–{lr_label(lrs[-1])}"
    fin = d[~d["diverged"]]
    adjusted = d["metric"].astype(float).copy()
    adjusted[~d["diverged"]] = opt.seed_adjusted(
        fin["lr"].to_numpy(float), fin["metric"].to_numpy(float), fin["seed"].to_numpy()
    )
    by_lr = d.assign(metric=adjusted).groupby("lr")
    means = by_lr["metric"].mean().reindex(lrs).to_numpy(float)
    counts = by_lr["diverged"].agg(["size", "sum"]).reindex(lrs)
    for lr, m, (n, n_div) in zip(lrs, means, counts.to_numpy(), strict=True):
        base.points.append({"lr": float(lr), "mean_metric": _finite(m), "n": int(n), "n_diverged": int(n_div)})
    finite = np.isfinite(means)
    if not finite.any():
        base.edge, base.reason = "low", f"every trial diverged on the grid {span}: extend the grid lower"
        return base, None
    i = int(np.argmin(np.where(finite, means, np.inf)))
    base.best_grid_lr = float(lrs[i])
    if i == 0 or i == len(xs) - 1:
        base.edge = "low" if i == 0 else "high"
        side = "below" if i == 0 else "above"
        base.reason = f"best LR {lr_label(lrs[i])} is at the {base.edge} edge of the grid {span}: extend it {side}"
        return base, None
    lf = opt.profile(
        np.log2(fin["lr"].to_numpy(float)),
        fin["metric"].to_numpy(float),
        fin["seed"].to_numpy(),
        np.log2(d.loc[d["diverged"], "lr"].to_numpy(float)),
        (float(xs[0]), float(xs[-1])),
    )
    if lf is None:  # too few finite LRs in the window around the best: say how many there, not on the grid
        x_fin = np.log2(fin["lr"].to_numpy(float))
        x_best, near = opt.near_best(x_fin, fin["metric"].to_numpy(float), fin["seed"].to_numpy())
        n_near, n_all = len(np.unique(x_fin[near])), len(np.unique(x_fin))
        base.reason = (
            f"only {n_near} learning rate{'s' if n_near != 1 else ''} with a finite loss lie within "
            f"{opt.WINDOW:g} octaves of the best ({lr_label(2**x_best)}), where an optimum needs 3"
            + (f" ({n_all} on the whole grid): add LRs between them" if n_all > n_near else "")
        )
        return base, None
    base.n_points = lf.n
    if not lf.curved:
        base.reason = "the loss is flat across the learning rates near the best: no optimum to locate"
        return base, None
    return base, lf


def _finish(base: RankOptimum, lf: opt.LocalFit, sigma2: float | None, dof: int) -> RankOptimum:
    x_star = lf.x_star
    if sigma2 is None:
        lo, hi = lf.neighbours
        base.interval_method = "grid"
        base.note = "no noise estimate (too few points in every group): the interval is the best LR's neighbours"
    else:
        lo, hi = opt.interval(lf, sigma2, dof)
        base.interval_method = "profile"
    lo, hi = min(lo, x_star), max(hi, x_star)
    if hi <= lo:  # a noise-free fit: the interval is the point; keep it a valid (tiny) range
        lo, hi = x_star - 1e-6, x_star + 1e-6
    base.log2_lr_star, base.lr_star = x_star, float(2**x_star)
    base.lo, base.hi = float(2**lo), float(2**hi)
    return base


def estimate(groups: list[pd.DataFrame]) -> tuple[list[RankOptimum], float | None, int]:
    """Every group's η*, their noise pooled: (optima, σ or None, the pool's degrees of freedom)."""
    locals_ = [_local(g) for g in groups]
    sigma2, dof = opt.pool_noise([lf for _, lf in locals_ if lf is not None])
    out = [base if lf is None else _finish(base, lf, sigma2, dof) for base, lf in locals_]
    return out, (None if sigma2 is None else math.sqrt(sigma2)), dof


def optimum(group: pd.DataFrame) -> RankOptimum:
    """η* of one group on its own (its noise from its own residuals)."""
    return estimate([group])[0][0]


def fit_full(df_full: pd.DataFrame) -> RankOptimum:
    """`optimum` for full-finetuning rows (regime "full", rank 0)."""
    if df_full.empty:
        raise MuaError("no full-finetuning trials in this run; add them with --ranks ...,full")
    return optimum(df_full.assign(regime=FULL, rank=0))
