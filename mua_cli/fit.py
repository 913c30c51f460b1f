"""η* per (regime, rank), the rank exponent per regime, and the μA test. numpy/scipy only, no torch.

The shape follows DESIGN.md §1's pitfalls: an optimum at the grid's edge is no optimum (it is reported as an
edge, never as η*); diverged trials are results that bound the LR from above (they enter as +inf loss); a
handful of ranks leaves few degrees of freedom, so every interval comes from the t distribution; and an
optimum holds only for the sweep's optimizer, schedule, steps and batch, so those are kept in `settings`
and a table that mixes them is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .errors import MuaError
from .theory import FULL, REGIMES, TRANSFER_REGIME, get_regime, lr_label

Z95 = 1.959963984540054
QUANT_FLOOR = 0.25  # log2 units: no per-rank interval is narrower than ±this (see `optimum`)
N_BOOT = 1000
BOOT_SEED = 2602_06204
# recipe keys that change where the optimum sits: rows that differ in any of them are not one run
OUTCOME_KEYS = (
    "model", "model_config", "task", "dtype", "targets", "data", "metric", "metric_frac", "betas", "eps",
    "weight_decay", "grad_clip", "warmup_frac", "min_lr_ratio", "alpha0", "per_layer_lr", "head_lr",
)  # fmt: skip
REQUIRED = ("regime", "rank", "lr", "seed", "status", "metric", "steps", "batch_size", "seq_len")


def t95(dof: int) -> float:
    """Two-sided 95% quantile of Student's t."""
    return float(stats.t.ppf(0.975, dof))


def few_dof_note(dof: int | None, what: str, n_ranks: int) -> str | None:
    """A plain note when an interval rests on t with one degree of freedom (t = 12.7, 6.5× a normal one)."""
    if dof != 1:
        return None
    t = t95(1)
    return (
        f"{what} rests on {n_ranks} usable ranks, so its 95% interval uses Student's t with 1 degree of freedom "
        f"(t = {t:.1f}, {t / Z95:.1f}× a normal interval): it is wide for that reason; more usable ranks narrow it"
    )


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


def _build(cls: type, d: dict) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RankOptimum:
    """The optimal LR of one (regime, rank) group, or why there is none. LRs in lr units, log2 where named."""

    regime: str
    rank: int  # 0 for full finetuning
    lr_star: float | None = None
    log2_lr_star: float | None = None
    lo: float | None = None  # 95% interval, lr units
    hi: float | None = None
    interval_method: str | None = None  # "bootstrap" | "fit" | "grid"
    edge: str | None = None  # "low" | "high": the best grid LR sits at that end of the grid
    best_grid_lr: float | None = None
    n_seeds: int = 0
    n_lrs: int = 0
    n_diverged: int = 0
    reason: str | None = None  # why there is no η*
    note: str | None = None
    # per LR: lr, mean_metric (None if diverged), n, n_diverged
    points: list[dict] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.lr_star is not None

    @property
    def half_width_log2(self) -> float | None:
        """The larger side of the 95% interval, in log2 units."""
        if not self.usable:
            return None
        return max(self.log2_lr_star - math.log2(self.lo), math.log2(self.hi) - self.log2_lr_star)

    @property
    def se_log2(self) -> float | None:
        hw = self.half_width_log2
        return None if hw is None else hw / Z95

    def to_dict(self) -> dict:
        return jsonable({**asdict(self), "usable": self.usable, "se_log2": self.se_log2})


@dataclass
class RegimeFit:
    """log2 η* = intercept + slope · log2 r over a regime's usable ranks, and the test against μA's slope."""

    regime: str
    expected_slope: float  # μA's rank exponent
    ranks: list[int]  # every rank with trials
    ranks_used: list[int]  # the usable ones, ascending
    log2_lr_stars: list[float]
    se_log2s: list[float]  # per-rank 95% half-width / 1.96
    unusable: list[dict] = field(default_factory=list)  # {rank, edge, reason}
    slope: float | None = None
    slope_se: float | None = None
    slope_interval: list[float] | None = None  # 95%, t(n-2); None with two ranks
    dof: int | None = None
    intercept: float | None = None
    resid_se: float | None = None  # residual SE of the free fit
    verdict: str = "untested"  # "consistent" | "inconsistent" | "untested"
    intercept_mua: float | None = None  # mean of log2 η* − s_μA · log2 r
    intercept_mua_se: float | None = None
    intercept_mua_interval: list[float] | None = None  # 95%; t(n-1), or the rank's own with one rank
    dof_mua: int | None = None
    resid_se_mua: float | None = None  # residual SE about μA's line
    note: str | None = None

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


@dataclass
class Pooled:
    mean: float
    se: float
    half: float  # 95% half-width
    dof: int | None
    resid_se: float | None


def pool_log2(ys: list[float], ses: list[float]) -> Pooled:
    """Mean of log2 values with a 95% half-width.

    Variance = scatter²/n + Σ se_i²/n²: the residual scatter alone says nothing with two ranks whose optima
    happen to agree (quantised grids make that common), and the per-rank widths alone miss misfit; adding both
    is conservative. t(n-1) for n ≥ 2; one value keeps its own interval.
    """
    y, se = np.asarray(ys, float), np.asarray(ses, float)
    n = len(y)
    meas = float(np.sum(se**2)) / n**2
    if n == 1:
        return Pooled(float(y[0]), math.sqrt(meas), Z95 * math.sqrt(meas), None, None)
    s = float(np.std(y, ddof=1))
    tot = math.sqrt(s**2 / n + meas)
    return Pooled(float(y.mean()), tot, t95(n - 1) * tot, n - 1, s)


@dataclass
class FullComparison:
    """μA says η*_B:1 / η*_full ≈ 1; this is what the run measured."""

    b1_lr: float
    b1_interval: list[float]
    b1_ranks: list[int]
    full_lr: float
    full_interval: list[float]
    ratio: float
    ratio_interval: list[float]
    consistent_with_one: bool

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


@dataclass
class FitResult:
    settings: dict
    optima: list[RankOptimum]
    regimes: dict[str, RegimeFit]
    full: RankOptimum | None = None
    full_vs_b1: FullComparison | None = None
    n_trials: int = 0
    n_failed: int = 0
    n_diverged: int = 0
    schema: int = 1

    def to_dict(self) -> dict:
        """fit.json: JSON-ready (no NaN/inf), and `from_dict` reads it back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["optima"] = [o.to_dict() for o in self.optima]
        d["regimes"] = {k: r.to_dict() for k, r in self.regimes.items()}
        for k in ("full", "full_vs_b1"):
            d[k] = d[k].to_dict() if d[k] else None
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> FitResult:
        try:
            d = dict(d)
            d["optima"] = [_build(RankOptimum, o) for o in d["optima"]]
            d["regimes"] = {k: _build(RegimeFit, r) for k, r in d["regimes"].items()}
            d["full"] = _build(RankOptimum, d["full"]) if d.get("full") else None
            d["full_vs_b1"] = _build(FullComparison, d["full_vs_b1"]) if d.get("full_vs_b1") else None
            return _build(cls, d)
        except (KeyError, TypeError, AttributeError) as e:
            raise MuaError(f"not a mua fit document (bad or missing field: {e})") from None

    def optima_for(self, regime: str) -> list[RankOptimum]:
        return sorted((o for o in self.optima if o.regime == regime), key=lambda o: o.rank)


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    """Drop failed (or unfinished) rows; a diverged row gets metric +inf, worse than any finite loss."""
    metric = pd.to_numeric(df["metric"], errors="coerce").astype(float).to_numpy()
    status = df["status"].astype(str).str.lower().to_numpy()
    diverged = (status == "diverged") | ((status == "ok") & np.isinf(metric))
    ok = (status == "ok") & np.isfinite(metric)
    out = df.loc[ok | diverged].copy()
    out["metric"] = np.where(diverged, np.inf, metric)[ok | diverged]
    out["diverged"] = diverged[ok | diverged]
    return out


def _vertices(xs: np.ndarray, means: np.ndarray) -> np.ndarray:
    """x* for each row of per-LR means (rows: resamples; NaN = no trial, inf = diverged).

    The parabola through the best point and its two neighbours, vertex clamped to the neighbours' range;
    the best grid point itself where it has no two finite neighbours; NaN where nothing is finite.
    """
    y = np.where(np.isnan(means), np.inf, means)
    rows, n = np.arange(len(y)), y.shape[1]
    i = np.argmin(y, axis=1)
    out = xs[i].astype(float)
    out[~np.isfinite(y[rows, i])] = np.nan
    j = np.clip(i, 1, n - 2)
    x0, x1, x2 = xs[j - 1], xs[j], xs[j + 1]
    y0, y1, y2 = y[rows, j - 1], y[rows, j], y[rows, j + 1]
    good = (i == j) & np.isfinite(y0) & np.isfinite(y1) & np.isfinite(y2)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        v = np.where(den != 0, x1 - 0.5 * num / den, x1)
    v = np.clip(v, x0, x2)
    return np.where(good, v, out)


def _ls_half_width(x: np.ndarray, y: np.ndarray) -> float | None:
    """95% half-width of a least-squares parabola's vertex: delta-method SE × t(n-3). None if not convex."""
    xc = x - x.mean()
    X = np.column_stack([xc**2, xc, np.ones_like(xc)])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    a, b = coef[0], coef[1]
    if a <= 0:
        return None
    res = y - X @ coef
    cov = float(res @ res) / (len(x) - 3) * np.linalg.inv(X.T @ X)
    g = np.array([b / (2 * a**2), -1 / (2 * a), 0.0])  # ∂(-b/2a)/∂(a, b, c)
    return t95(len(x) - 3) * math.sqrt(max(float(g @ cov @ g), 0.0))


def optimum(group: pd.DataFrame) -> RankOptimum:
    """η* of one (regime, rank) group with a 95% interval on log2 η*.

    Interval, by the data at hand: ≥2 seeds → bootstrap over seeds (1000 seeded resamples, percentiles);
    one seed with ≥4 finite points within two grid steps of the best → least-squares parabola on them,
    delta-method SE, t(n-3); otherwise (or when a neighbour of the best diverged) → the neighbours' bracket.
    The interval is then clipped to the grid's span and widened to at least ±0.25 log2 around η*: a grid
    of powers of 2 cannot place an optimum more finely than that, whatever a lucky resample says.
    """
    if group.empty:
        raise MuaError("no trials in this group")
    base = RankOptimum(regime=str(group["regime"].iloc[0]), rank=int(group["rank"].iloc[0]))
    d = _clean(group)
    base.n_seeds, base.n_lrs = int(d["seed"].nunique()), int(d["lr"].nunique())
    base.n_diverged = int(d["diverged"].sum())
    if d.empty:
        base.reason = "every trial failed"
        return base
    per = d.groupby(["seed", "lr"])["metric"].mean().unstack("lr")  # seeds × LRs, NaN where absent
    xs = np.log2(per.columns.to_numpy(float))
    mat = per.to_numpy(float)
    have = ~np.isnan(mat)
    with np.errstate(invalid="ignore"):
        means = np.where(have, mat, 0.0).sum(0) / have.sum(0)
    counts = d.groupby("lr")["diverged"].agg(["size", "sum"])
    for k, lr in enumerate(per.columns):
        n, n_div = (int(v) for v in counts.loc[lr])
        base.points.append({"lr": float(lr), "mean_metric": _finite(means[k]), "n": n, "n_diverged": n_div})
    finite = np.isfinite(means)
    span = f"{lr_label(2 ** xs[0])}–{lr_label(2 ** xs[-1])}"
    if not finite.any():
        base.edge, base.reason = "low", f"every trial diverged on the grid {span}: extend the grid lower"
        return base
    i = int(np.argmin(np.where(finite, means, np.inf)))
    base.best_grid_lr = float(2 ** xs[i])
    best = lr_label(base.best_grid_lr)
    if i == 0 or i == len(xs) - 1:
        base.edge = "low" if i == 0 else "high"
        side = "below" if i == 0 else "above"
        base.reason = f"best LR {best} is at the {base.edge} edge of the grid {span}: extend it {side}"
        return base
    if finite.sum() < 3:
        base.reason = f"only {int(finite.sum())} learning rates have a finite loss; an optimum needs 3"
        return base
    if not (finite[i - 1] and finite[i + 1]):
        x_star, lo, hi, method = float(xs[i]), float(xs[i - 1]), float(xs[i + 1]), "grid"
        base.note = "a neighbour of the best grid LR diverged: η* is that LR, bracketed by its neighbours"
    else:
        x_star = float(_vertices(xs, means[None, :])[0])
        lo, hi, method = float(xs[i - 1]), float(xs[i + 1]), "grid"
        if base.n_seeds >= 2:
            rng = np.random.default_rng(BOOT_SEED)
            idx = rng.integers(0, len(mat), size=(N_BOOT, len(mat)))
            m, h = np.where(have, mat, 0.0)[idx], have[idx]
            with np.errstate(invalid="ignore", divide="ignore"):
                boot = _vertices(xs, np.where(h.sum(1) > 0, m.sum(1) / h.sum(1), np.nan))
            lo, hi = (float(q) for q in np.nanpercentile(boot, [2.5, 97.5]))
            method = "bootstrap"
        else:
            w = np.arange(max(i - 2, 0), min(i + 3, len(xs)))
            w = w[finite[w]]
            hw = _ls_half_width(xs[w], means[w]) if len(w) >= 4 else None
            if hw is not None:
                lo, hi, method = x_star - hw, x_star + hw, "fit"
    lo = min(max(lo, float(xs[0])), x_star - QUANT_FLOOR)
    hi = max(min(hi, float(xs[-1])), x_star + QUANT_FLOOR)
    base.log2_lr_star, base.lr_star = x_star, float(2**x_star)
    base.lo, base.hi, base.interval_method = float(2**lo), float(2**hi), method
    return base


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def fit_full(df_full: pd.DataFrame) -> RankOptimum:
    """`optimum` for full-finetuning rows (regime "full", rank 0)."""
    if df_full.empty:
        raise MuaError("no full-finetuning trials in this run; add them with --ranks ...,full")
    return optimum(df_full.assign(regime=FULL, rank=0))


def fit_regime(optima: list[RankOptimum], regime: str) -> RegimeFit:
    """OLS of log2 η* on log2 r over the usable ranks, tested against μA's exponent.

    Slope variance = residual² / Sxx (t, n-2 dof) plus the per-rank interval widths propagated through the
    OLS weights: with quantised optima a fit can look perfect, and the per-rank term keeps it from claiming
    zero uncertainty. With two ranks the slope has no interval and μA's exponent is untested.
    """
    reg = get_regime(regime)
    mine = sorted((o for o in optima if o.regime == reg.name), key=lambda o: o.rank)
    use = [o for o in mine if o.usable]
    rf = RegimeFit(
        regime=reg.name,
        expected_slope=reg.rank_exponent,
        ranks=[o.rank for o in mine],
        ranks_used=[o.rank for o in use],
        log2_lr_stars=[float(o.log2_lr_star) for o in use],
        se_log2s=[float(o.se_log2) for o in use],
        unusable=[{"rank": o.rank, "edge": o.edge, "reason": o.reason} for o in mine if not o.usable],
    )
    n = len(use)
    if n == 0:
        rf.note = "no rank has an interior optimum: nothing to fit"
        return rf
    x = np.log2(np.array(rf.ranks_used, float))
    y, se = np.array(rf.log2_lr_stars), np.array(rf.se_log2s)
    p = pool_log2(list(y - reg.rank_exponent * x), list(se))
    rf.intercept_mua, rf.intercept_mua_se, rf.dof_mua, rf.resid_se_mua = p.mean, p.se, p.dof, p.resid_se
    rf.intercept_mua_interval = [p.mean - p.half, p.mean + p.half]
    if n == 1:
        rf.note = f"one usable rank ({rf.ranks_used[0]}): no slope; a slope needs 2 usable ranks"
        return rf
    xbar, sxx = float(x.mean()), float(((x - x.mean()) ** 2).sum())
    rf.slope = float(((x - xbar) * (y - y.mean())).sum() / sxx)
    rf.intercept = float(y.mean() - rf.slope * xbar)
    if n == 2:
        dof_note = few_dof_note(rf.dof_mua, "η* on μA's line", n)
        rf.note = f"two usable ranks give a slope but no interval (0 dof): μA's exponent untested; {dof_note}"
        return rf
    rf.dof = n - 2
    rf.note = few_dof_note(rf.dof, "the slope", n)
    res = y - rf.intercept - rf.slope * x
    rf.resid_se = math.sqrt(float(res @ res) / rf.dof)
    w = (x - xbar) / sxx
    rf.slope_se = math.sqrt(rf.resid_se**2 / sxx + float((w**2 * se**2).sum()))
    half = t95(rf.dof) * rf.slope_se
    rf.slope_interval = [rf.slope - half, rf.slope + half]
    inside = rf.slope_interval[0] <= reg.rank_exponent <= rf.slope_interval[1]
    rf.verdict = "consistent" if inside else "inconsistent"
    return rf


def _recipe(v: Any) -> dict:
    if isinstance(v, dict):
        return v
    if isinstance(v, str) and v.strip().startswith("{"):
        return json.loads(v)
    return {}


def _check_one_run(df: pd.DataFrame) -> None:
    recs = [_recipe(r) for r in df["recipe"]] if "recipe" in df else []
    seen = {c: [f"{v:g}" for v in pd.to_numeric(df[c]).dropna()] for c in ("steps", "batch_size", "seq_len")}
    seen |= {
        f"recipe {k!r}": [json.dumps(r[k], sort_keys=True, default=str) for r in recs if k in r] for k in OUTCOME_KEYS
    }
    for what, vals in seen.items():
        if len(set(vals)) > 1:
            raise MuaError(
                f"this run mixes trials with different {what} ({', '.join(sorted(set(vals)))}): an "
                f"optimal LR holds for one setting, so fit each setting as its own run"
            )


def _settings(df: pd.DataFrame) -> dict:
    """What every prediction from this run holds for."""
    rec = _recipe(df["recipe"].iloc[0]) if "recipe" in df else {}
    b1, b2 = rec.get("betas", (0.9, 0.999))
    eps, wd, clip = rec.get("eps", 1e-8), rec.get("weight_decay", 0.01), rec.get("grad_clip", 1.0)
    warm, floor = rec.get("warmup_frac", 0.05), rec.get("min_lr_ratio", 0.1)
    return {
        "model": rec.get("model"),
        "steps": int(df["steps"].iloc[0]),
        "batch_size": int(df["batch_size"].iloc[0]),
        "seq_len": int(df["seq_len"].iloc[0]),
        "alpha0": float(rec.get("alpha0", 1.0)),
        "optimizer": f"AdamW(betas=({b1:g}, {b2:g}), eps={eps:g}, weight_decay={wd:g}), grad clip {clip:g}",
        "schedule": f"linear warmup over {warm:.0%} of steps, then cosine decay to {floor:g}× the peak LR",
        "recipe": {k: rec[k] for k in OUTCOME_KEYS if k in rec},
    }


def _compare(b1: RegimeFit, full: RankOptimum) -> FullComparison:
    """η*_B:1 (pooled over usable ranks) / η*_full; the two 95% log2 half-widths add in quadrature."""
    p = pool_log2(b1.log2_lr_stars, b1.se_log2s)
    hw_full = full.half_width_log2
    r = p.mean - full.log2_lr_star
    half = math.sqrt(p.half**2 + hw_full**2)
    return FullComparison(
        b1_lr=2**p.mean,
        b1_interval=[2 ** (p.mean - p.half), 2 ** (p.mean + p.half)],
        b1_ranks=list(b1.ranks_used),
        full_lr=full.lr_star,
        full_interval=[full.lo, full.hi],
        ratio=2**r,
        ratio_interval=[2 ** (r - half), 2 ** (r + half)],
        consistent_with_one=abs(r) <= half,
    )


def fit_run(df: pd.DataFrame) -> FitResult:
    """Every (regime, rank) optimum, every regime's slope, full finetuning and the B:1 comparison."""
    if df is None or len(df) == 0:
        raise MuaError("the trial table is empty: run `mua sweep` first")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise MuaError(f"the trial table lacks column(s) {', '.join(missing)}")
    _check_one_run(df)
    regimes = df["regime"].astype(str).str.strip()
    for name in sorted(set(regimes) - {FULL}):
        get_regime(name)  # an unknown name is a MuaError
    df = df.assign(regime=regimes)
    clean = _clean(df)
    if clean.empty:
        raise MuaError(f"no usable trials: all {len(df)} trials failed")
    if clean["diverged"].all():
        raise MuaError(f"all {len(clean)} finished trials diverged: lower the learning-rate grid")
    lora = df[df["regime"] != FULL]
    optima = [optimum(g) for _, g in lora.groupby(["regime", "rank"], sort=True)]
    present = set(lora["regime"])
    fits = {name: fit_regime(optima, name) for name in REGIMES if name in present}
    full_rows = df[df["regime"] == FULL]
    full = fit_full(full_rows) if len(full_rows) else None
    b1 = fits.get(TRANSFER_REGIME)
    cmp = _compare(b1, full) if (full is not None and full.usable and b1 and b1.ranks_used) else None
    return FitResult(
        settings=_settings(df),
        optima=optima,
        regimes=fits,
        full=full,
        full_vs_b1=cmp,
        n_trials=len(df),
        n_failed=len(df) - len(clean),
        n_diverged=int(clean["diverged"].sum()),
    )
