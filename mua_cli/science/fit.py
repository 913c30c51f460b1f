"""η* per (regime, rank), the rank exponent per regime, and the full-finetuning comparison. No torch.

The pitfalls of reading an optimal LR off a sweep, as this module meets them (docs/validation.md):
- η* comes from every LR and seed within 1.5 octaves of the best grid point (rank_optima.py, optimum.py: an
  asymmetric parabola in log2 lr with one level per seed), not from three points. An optimum at the grid's edge is no
  optimum. Diverged trials are censored results that bound η* from above.
- Per-rank intervals are likelihood-ratio intervals whose noise level is pooled over every group of the run,
  so one seed borrows its noise from the other groups instead of inflating by t(1).
- The slope is a weighted least-squares fit (weights 1/(se² + τ²), τ the scatter of the ranks about a power
  law, never below the study's floor), with the measurement noise counted once.
- The slope is then shrunk toward μA's exponent with the prior width the study measured (calibration.py):
  the data and μA are weighed by their precision, and nothing is decided by a test's verdict.
- An optimum holds only for the sweep's optimizer, schedule, steps and batch: those are kept in `settings`
  and a table that mixes them is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MuaError
from . import calibration as cal
from .anchor import full_anchor
from .rank_optima import Z95, RankOptimum, clean_trials, estimate, jsonable
from .theory import FULL, REGIMES, TRANSFER_REGIME, get_regime

if TYPE_CHECKING:  # pandas only where trials are fitted: a saved fit reads back without it (`mua transfer`)
    import pandas as pd

REQUIRED = ("regime", "rank", "lr", "seed", "status", "metric", "steps", "batch_size", "seq_len")


def _build(cls: type, d: dict) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RegimeFit:
    """log2 η* against log2 r over a regime's usable ranks, and the slope shrunk toward μA's.

    The line is kept as its weighted centre (centre_x, centre_y) and a slope, so a prediction's variance is
    centre_se² + slope_se² · (x − centre_x)² (+ τ² for a rank's own deviation): it grows with the distance
    of the extrapolation.
    """

    regime: str
    expected_slope: float  # μA's rank exponent
    ranks: list[int]  # every rank with trials
    ranks_used: list[int]  # the usable ones, ascending
    log2_lr_stars: list[float]
    se_log2s: list[float]
    unusable: list[dict] = field(default_factory=list)  # {rank, edge, reason}
    tau: float | None = None  # scatter of the ranks about the line (log2), floored at the study's value
    slope: float | None = None  # the measured power-law slope (weighted least squares); None with one rank
    slope_se: float | None = None
    slope_interval: list[float] | None = None  # 95%
    verdict: str = "untested"  # "consistent" | "inconsistent" with μA at 95 %: a description, not a rule
    # The prediction line: log2 η* = centre_y + b·(x − centre_x) + curvature·(x − curve_x)², x = log2 r, with the
    # curvature in rank the study measured for this regime (calibration.RANK_CURVATURE; 0 where it found none)
    # and b the data's slope of that curve (line_slope) shrunk toward μA's exponent (shrunk_slope).
    curvature: float = 0.0
    curvature_sd: float = 0.0
    curve_x: float | None = None
    curve_m2: float | None = None  # weighted mean of (x − curve_x)², and its weighted slope on x: for the
    curve_s2: float | None = None  # curvature's uncertainty at a new rank
    centre_x: float | None = None  # weighted mean of log2 r
    centre_y: float | None = None  # weighted mean of log2 η* − curvature·(x − curve_x)²
    centre_se: float | None = None
    line_slope: float | None = None
    line_slope_se: float | None = None
    prior_sd: float = cal.SLOPE_PRIOR_SD
    shrunk_slope: float | None = None  # the slope used for predictions: data and μA weighed by precision
    shrunk_slope_se: float | None = None
    data_weight: float | None = None  # the measured slope's share of the shrunk slope, 0..1
    intercept_mua: float | None = None  # log2 η* at r = 1 on μA's slope through the weighted centre
    note: str | None = None

    def to_dict(self) -> dict:
        return jsonable(asdict(self))

    def line(self, x0: float, slope: str = "shrunk") -> tuple[float, float]:
        """log2 η* at log2 r = x0 and its standard error, for a new rank (τ included).

        slope: "shrunk" (default), "measured" (the data alone) or "mua" (μA's exponent taken as exact)."""
        if self.centre_y is None:
            raise MuaError(f"regime {self.regime} has no usable rank")
        if slope == "mua":  # μA's pure power law through the measured ranks, no curvature
            centre = self.intercept_mua + self.expected_slope * x0
            return centre, math.sqrt(self.centre_se**2 + self.tau**2)
        if slope == "measured":
            if self.line_slope is None:
                raise MuaError(f"regime {self.regime} has one usable rank: no measured slope")
            b, b_se = self.line_slope, self.line_slope_se
        else:
            b, b_se = self.shrunk_slope, self.shrunk_slope_se
        d = x0 - self.centre_x
        q = (x0 - self.curve_x) ** 2 - (self.curve_m2 + self.curve_s2 * d)  # what the line cannot absorb of c·x²
        centre = self.centre_y + b * d + self.curvature * (x0 - self.curve_x) ** 2
        return centre, math.sqrt(self.centre_se**2 + (b_se * d) ** 2 + (self.curvature_sd * q) ** 2 + self.tau**2)


@dataclass
class FullComparison:
    """η* of full finetuning measured beside B:1's η* read as the study's anchor (calibration.FULL_ANCHOR)."""

    b1_lr: float  # B:1's η* read as `anchor`
    b1_interval: list[float]
    ref_rank: int
    b1_ranks: list[int]
    full_lr: float
    full_interval: list[float]
    ratio: float  # B:1's η* (anchor) / full-ft η*: the one direction mua quotes
    ratio_interval: list[float]
    consistent_with_one: bool
    anchor: str = "line16"  # how B:1's η* was read (fit.ANCHORS); fit.json from before the anchor was chosen: the line
    anchor_label: str = "B:1's fitted line at rank 16"  # the name `mua fit` and `transfer` print for it

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


@dataclass
class FitResult:
    settings: dict
    optima: list[RankOptimum]
    regimes: dict[str, RegimeFit]
    full: RankOptimum | None = None
    full_vs_b1: FullComparison | None = None
    noise_sd: float | None = None  # pooled residual SD of the loss about the local fits
    noise_dof: int = 0
    n_trials: int = 0
    n_failed: int = 0
    n_diverged: int = 0
    schema: int = 2

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
            if d.get("schema") != 2:
                raise MuaError(f"fit document schema {d.get('schema')!r}, this mua writes 2")
            d["optima"] = [_build(RankOptimum, o) for o in d["optima"]]
            d["regimes"] = {k: _build(RegimeFit, r) for k, r in d["regimes"].items()}
            d["full"] = _build(RankOptimum, d["full"]) if d.get("full") else None
            d["full_vs_b1"] = _build(FullComparison, d["full_vs_b1"]) if d.get("full_vs_b1") else None
            return _build(cls, d)
        except (KeyError, TypeError, AttributeError) as e:
            raise MuaError(f"not a mua fit document (bad or missing field: {e})") from None

    def optima_for(self, regime: str) -> list[RankOptimum]:
        return sorted((o for o in self.optima if o.regime == regime), key=lambda o: o.rank)


def _tau2(x: np.ndarray, y: np.ndarray, v: np.ndarray) -> float:
    """DerSimonian–Laird scatter of y about a weighted line beyond the variances v, floored by the study."""
    floor = cal.RANK_SCATTER_FLOOR**2
    if len(x) < 3:
        return floor
    w = 1 / v
    X = np.column_stack([np.ones_like(x), x])
    beta = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * y))
    q = float(w @ (y - X @ beta) ** 2)
    inv = np.linalg.inv(X.T @ (w[:, None] * X))
    trace = float(w.sum() - np.trace(inv @ (X.T @ ((w**2)[:, None] * X))))
    return max(floor, (q - (len(x) - 2)) / trace if trace > 0 else 0.0)


def fit_regime(optima: list[RankOptimum], regime: str, prior_sd: float = cal.SLOPE_PRIOR_SD) -> RegimeFit:
    """Weighted line of log2 η* on log2 r over the usable ranks; its slope shrunk toward μA's.

    Weights 1/(se² + τ²); slope interval ±1.96 SE (the per-rank SEs carry their own noise level, so no t
    inflation); shrinkage: a normal prior N(μA's exponent, prior_sd²) times the slope's likelihood."""
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
        prior_sd=prior_sd,
    )
    if not use:
        rf.note = "no rank has an interior optimum: nothing to fit"
        return rf
    x = np.log2(np.array(rf.ranks_used, float))
    y, se = np.array(rf.log2_lr_stars), np.array(rf.se_log2s)
    rf.curvature, rf.curvature_sd = cal.RANK_CURVATURE.get(reg.name, (0.0, 0.0))
    rf.curve_x = float(x.mean())
    yc = y - rf.curvature * (x - rf.curve_x) ** 2
    tau2 = _tau2(x, yc, se**2 + 1e-12)
    w = 1 / (se**2 + tau2)
    rf.tau = math.sqrt(tau2)
    rf.centre_x, rf.centre_y = float(w @ x / w.sum()), float(w @ yc / w.sum())
    rf.centre_se = math.sqrt(1 / w.sum())
    rf.intercept_mua = float(w @ (y - reg.rank_exponent * x) / w.sum())
    dx = x - rf.centre_x
    sxx = float(w @ dx**2)
    rf.curve_m2 = float(w @ (x - rf.curve_x) ** 2 / w.sum())
    rf.curve_s2 = float(w @ (dx * (x - rf.curve_x) ** 2) / sxx) if sxx > 0 else 0.0
    prior_prec = 1 / prior_sd**2
    if len(use) == 1:
        rf.shrunk_slope, rf.shrunk_slope_se, rf.data_weight = reg.rank_exponent, prior_sd, 0.0
        rf.note = f"one usable rank ({rf.ranks_used[0]}): no measured slope; μA's exponent with the study's spread"
        return rf
    rf.slope = float(w @ (dx * (y - w @ y / w.sum())) / sxx)
    rf.slope_se = math.sqrt(1 / sxx)
    rf.slope_interval = [rf.slope - Z95 * rf.slope_se, rf.slope + Z95 * rf.slope_se]
    inside = rf.slope_interval[0] <= reg.rank_exponent <= rf.slope_interval[1]
    rf.verdict = "consistent" if inside else "inconsistent"
    rf.line_slope, rf.line_slope_se = float(w @ (dx * (yc - rf.centre_y)) / sxx), rf.slope_se
    rf.data_weight = sxx / (sxx + prior_prec)
    rf.shrunk_slope = rf.data_weight * rf.line_slope + (1 - rf.data_weight) * reg.rank_exponent
    rf.shrunk_slope_se = math.sqrt(1 / (sxx + prior_prec))
    return rf


def _recipe(v: Any) -> dict:
    if isinstance(v, dict):
        return v
    if isinstance(v, str) and v.strip().startswith("{"):
        return json.loads(v)
    return {}


def _check_one_run(df: pd.DataFrame) -> None:
    import pandas as pd

    recs = [_recipe(r) for r in df["recipe"]] if "recipe" in df else []
    seen = {c: [f"{v:g}" for v in pd.to_numeric(df[c]).dropna()] for c in ("steps", "batch_size", "seq_len")}
    # each trial carries its recipe's outcome keys (spec/config.py): rows that differ in any are not one run
    keys = sorted(set().union(*recs)) if recs else []
    seen |= {f"recipe {k!r}": [json.dumps(r[k], sort_keys=True, default=str) for r in recs if k in r] for k in keys}
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
        "recipe": rec,
    }


def _compare(b1: RegimeFit, full: RankOptimum, optima: list[RankOptimum]) -> FullComparison | None:
    """B:1's η* read as the study's anchor against full finetuning's; the two log2 SEs add in quadrature."""
    a = full_anchor(b1, optima, fit_regime)
    if a is None:
        return None
    c, c_se = a.log2, a.se
    r = c - full.log2_lr_star
    half = Z95 * math.sqrt(c_se**2 + full.se_log2**2)
    return FullComparison(
        b1_lr=2**c,
        b1_interval=[2 ** (c - Z95 * c_se), 2 ** (c + Z95 * c_se)],
        ref_rank=cal.FULL_REF_RANK,
        b1_ranks=list(b1.ranks_used),
        full_lr=full.lr_star,
        full_interval=[full.lo, full.hi],
        ratio=2**r,
        ratio_interval=[2 ** (r - half), 2 ** (r + half)],
        consistent_with_one=abs(r) <= half,
        anchor=a.how,
        anchor_label=a.label,
    )


def fit_run(df: pd.DataFrame, prior_sd: float = cal.SLOPE_PRIOR_SD) -> FitResult:
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
    clean = clean_trials(df)
    if clean.empty:
        raise MuaError(f"no usable trials: all {len(df)} trials failed")
    if clean["diverged"].all():
        raise MuaError(f"all {len(clean)} finished trials diverged: lower the learning-rate grid")
    full_rows = df[df["regime"] == FULL].assign(rank=0)
    groups = [g for _, g in df[df["regime"] != FULL].groupby(["regime", "rank"], sort=True)]
    found, noise_sd, noise_dof = estimate(groups + ([full_rows] if len(full_rows) else []))
    optima, full = (found[:-1], found[-1]) if len(full_rows) else (found, None)
    present = {o.regime for o in optima}
    fits = {name: fit_regime(optima, name, prior_sd) for name in REGIMES if name in present}
    b1 = fits.get(TRANSFER_REGIME)
    cmp = _compare(b1, full, optima) if (full is not None and full.usable and b1 and b1.ranks_used) else None
    return FitResult(
        settings=_settings(df),
        optima=optima,
        regimes=fits,
        full=full,
        full_vs_b1=cmp,
        noise_sd=noise_sd,
        noise_dof=noise_dof,
        n_trials=len(df),
        n_failed=len(df) - len(clean),
        n_diverged=int(clean["diverged"].sum()),
    )
