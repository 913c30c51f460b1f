#!/usr/bin/env python3
"""Score mua's prediction rules on the kept study results, leave one FAMILY out, and write docs/validation_tables.md.

Reads studies/results/<workload>/{trials.csv,recipe.yaml,meta.json} (written by transfer_study.py on the GPU),
fits every workload with mua's own `fit_run`, and for each architecture family in turn predicts what its
workloads measured from what the other families measured (docs/validation.md, "Protocol", fixes the
candidates, the scoring and the selection):
- full finetuning from B:1's ranks ≤ 64: every anchor × ratio candidate, the proxy candidates, μA's raw rule;
- the largest measured rank from the smaller ones: line, measured slope, straight line, μA's exponent.
It picks the winners by the pre-registered criterion, prints the calibration constants
(mua_cli/science/calibration.py) the whole study supports for them, writes each workload's fit.json beside
its trials, and renders the tables (docs/validation_tables.md) and plots of docs/validation.md.
No GPU: `python studies/report.py` re-renders everything from the kept files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import optimize, stats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mua_cli.science import calibration as cal  # noqa: E402
from mua_cli.science.anchor import ANCHORS, anchor_value  # noqa: E402
from mua_cli.science.fit import FitResult, RegimeFit, fit_regime, fit_run  # noqa: E402
from mua_cli.science.rank_optima import Z95  # noqa: E402
from mua_cli.science.theory import REGIMES  # noqa: E402

RESULTS = REPO / "studies" / "results"
MAX_SOURCE_RANK = 64  # a user's `--ranks 4,16,64`: what a prediction may use
# proxy → target pairs for the older `--calibrate` rule: fewer steps of the same model, a narrower model
PROXIES = {"w512": "w512-s100", "w1024": "w512"}
# The first six workloads' families and depths, which their meta.json predates; later ones write their own.
FAMILIES = {"w256": "llama", "w512": "llama", "w1024": "llama", "w512-s100": "llama", "smollm2-135m": "llama",
            "minilm-l6-plays": "bert"}  # fmt: skip
DEPTHS = {"smollm2-135m": 30, "minilm-l6-plays": 6}
FEATURES = ("slope", "width", "depth", "steps", "task")
RATIOS = ("const", *FEATURES, "all")
RANK_RULES = ("line", "line-measured", "line-straight", "muA-pooled", "muA-last")
RIDGE = 1.0
EARLIER_WINNERS = ("cell-max ÷ slope",)  # the second run's winner, which docs/validation.md still quotes
META = " (meta)"  # a candidate's name with the third run's random-effects interval
GATE_RULE = "line16 ÷ const (meta)"  # the fourth run gates the full-ft check by this rule's interval (shipped)


@dataclass
class Workload:
    name: str
    meta: dict
    recipe: dict
    df: pd.DataFrame
    fit: FitResult  # every rank
    source: FitResult  # LoRA ranks ≤ 64, no full-ft trials: what a user who did not measure full-ft would have
    proxy: FitResult | None = None  # a proxy run's fit (meta proxy_for = this workload), where one was measured
    below: dict = field(default_factory=dict)  # rank → fit of the LoRA trials below that rank (cached)

    @property
    def width(self) -> int:
        return int(self.meta.get("width") or (self.recipe.get("model_config") or {}).get("hidden_size") or 0)

    @property
    def family(self) -> str:
        return str(self.meta.get("family") or FAMILIES.get(self.name) or self.meta.get("model") or self.name)

    @property
    def depth(self) -> int:
        mc = self.recipe.get("model_config") or {}
        return int(self.meta.get("layers") or mc.get("num_hidden_layers") or DEPTHS.get(self.name) or 0)

    @property
    def task(self) -> str:
        return str(self.meta.get("task") or self.recipe.get("task") or "causal-lm")

    @property
    def steps(self) -> int:
        return int(self.df["steps"].iloc[0])

    def fit_below(self, rank: int) -> FitResult:
        if rank not in self.below:
            keep = (self.df["rank"] < rank) & (self.df["regime"] != "full")
            self.below[rank] = fit_run(self.df[keep])
        return self.below[rank]


def _read(folder: Path) -> tuple[dict, dict, pd.DataFrame]:
    df = pd.read_csv(folder / "trials.csv")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    df["recipe"] = [recipe] * len(df)
    return json.loads((folder / "meta.json").read_text()), recipe, df


def load(folder: Path) -> Workload:
    meta, recipe, df = _read(folder)
    keep = (df["rank"] <= MAX_SOURCE_RANK) & (df["regime"] != "full")
    return Workload(folder.name, meta, recipe, df, fit_run(df), fit_run(df[keep]))


def load_all(res: Path = RESULTS) -> list[Workload]:
    """Every workload of the study, each with the fit of its proxy run (RESULTS/proxy/NAME, meta `proxy_of`:
    full finetuning at a quarter of the steps) where one was measured."""
    folders = sorted(p for p in res.iterdir() if (p / "trials.csv").is_file()) if res.is_dir() else []
    out = {p.name: load(p) for p in folders}
    proxies = sorted(p for p in (res / "proxy").glob("*") if (p / "trials.csv").is_file())
    for p in proxies:
        meta, _, df = _read(p)
        target = meta.get("proxy_of") or meta.get("proxy_for")
        if target in out:
            out[target].proxy = fit_run(df)
    return list(out.values())


def full_truth(w: Workload) -> tuple[float, float] | None:
    f = w.fit.full
    return (f.log2_lr_star, f.se_log2) if f is not None and f.usable else None


def loss_at(w: Workload, log2_lr: float) -> float:
    """Mean full-finetuning loss at a log2 LR, linearly interpolated between the measured LRs (diverged: inf)."""
    pts = [(math.log2(p["lr"]), p["mean_metric"]) for p in w.fit.full.points]
    xs = np.array([p[0] for p in pts])
    ys = np.array([math.inf if p[1] is None else p[1] for p in pts])
    if log2_lr <= xs[0]:
        return float(ys[0])
    if log2_lr >= xs[-1]:
        return float(ys[-1])
    j = int(np.searchsorted(xs, log2_lr))
    t = (log2_lr - xs[j - 1]) / (xs[j] - xs[j - 1])
    return float(ys[j - 1] + t * (ys[j] - ys[j - 1]))


# ---------------------------------------------------------------- constants learned from a set of workloads


def slope_prior(workloads: list[Workload]) -> float:
    """RMS of (measured − μA) rank exponents over every regime of these workloads with ≥ 3 usable ranks."""
    d = [
        rf.slope - rf.expected_slope
        for w in workloads
        for rf in w.fit.regimes.values()
        if rf.slope is not None and len(rf.ranks_used) >= 3
    ]
    return float(math.sqrt(np.mean(np.square(d)))) if d else cal.SLOPE_PRIOR_SD


def rank_scatter(workloads: list[Workload]) -> float:
    """Scatter of per-rank η* about their regime's line beyond their own SEs, pooled (method of moments)."""
    excess, n = 0.0, 0
    for w in workloads:
        for rf in w.fit.regimes.values():
            k = len(rf.ranks_used)
            if k < 3:
                continue
            x, y = np.log2(rf.ranks_used), np.array(rf.log2_lr_stars)
            se = np.array(rf.se_log2s)
            res = y - np.polyval(np.polyfit(x, y, 1), x)
            excess += float(res @ res) - float((se**2).sum()) * (k - 2) / k
            n += k - 2
    return float(math.sqrt(max(excess / n, 0.0))) if n else cal.RANK_SCATTER_FLOOR


def curvatures(workloads: list[Workload]) -> dict[str, tuple[float, float]]:
    """Per regime: mean and spread over workloads of the (log2 r)² coefficient of a weighted quadratic through
    log2 η* at four or more ranks (calibration.RANK_CURVATURE). A regime seen in one workload gets none."""
    per: dict[str, list[float]] = {}
    for w in workloads:
        for name, rf in w.fit.regimes.items():
            if len(rf.ranks_used) >= 4:
                x, y = np.log2(rf.ranks_used), np.array(rf.log2_lr_stars)
                per.setdefault(name, []).append(float(np.polyfit(x, y, 2, w=1 / np.array(rf.se_log2s))[0]))
    return {k: (round(float(np.mean(v)), 4), round(float(np.std(v, ddof=1)), 4)) for k, v in per.items() if len(v) > 1}


@dataclass
class Fold:
    """What one set of training workloads teaches: the slope prior, the curvature, the ratio rules."""

    train: list[Workload]
    prior: float
    curv: dict

    @classmethod
    def of(cls, train: list[Workload]) -> Fold:
        return cls(train, slope_prior(train), curvatures(train))

    def regime(self, fit: FitResult, name: str, curved: bool = True) -> RegimeFit | None:
        """The regime's line refitted with this fold's prior and (or without) its curvature."""
        if name not in fit.regimes:
            return None
        with _curvature(self.curv if curved else {}):
            return fit_regime(fit.optima, name, self.prior)


@contextlib.contextmanager
def _curvature(curv: dict):
    saved, cal.RANK_CURVATURE = cal.RANK_CURVATURE, curv
    try:
        yield
    finally:
        cal.RANK_CURVATURE = saved


def features(w: Workload, b1: RegimeFit, tasks: list[str]) -> dict[str, list[float]]:
    """The observable features of a workload, each as the columns it adds to a ratio model."""
    slope = b1.slope if b1.slope is not None else 0.0
    return {
        "slope": [slope],
        "width": [math.log2(w.width) if w.width else 0.0],
        "depth": [math.log2(w.depth) if w.depth else 0.0],
        "steps": [math.log2(w.steps)],
        "task": [float(w.task == t) for t in tasks[1:]],
    }


@dataclass
class RatioRule:
    """log2 ρ (B:1 anchor over full-ft η*) as a function of features, learned on training workloads."""

    kind: str
    coef: np.ndarray | None  # intercept first; None: no prediction (too few workloads)
    cols: list[int]  # which feature columns (after the intercept) it uses
    s: float  # residual SD of the training workloads' log2 ρ about the rule
    dof: float
    cov: np.ndarray | None  # (X'X)^-1-like matrix for the leverage
    mean: np.ndarray | None = None  # standardization (ridge)
    sd: np.ndarray | None = None
    interval: str = "resid"  # "meta": s is τ, cov is Cov(β), and a new run's SE is √(τ² + v'Cov v)

    def predict(self, x: np.ndarray) -> tuple[float, float] | None:
        """(log2 ρ, SE of a new workload's log2 ρ around it) or None."""
        if self.coef is None:
            return None
        z = x[self.cols]
        if self.mean is not None:
            z = (z - self.mean) / self.sd
        v = np.concatenate([[1.0], z])
        h = float(v @ self.cov @ v)
        if self.interval == "meta":
            return float(v @ self.coef), math.sqrt(self.s**2 + h)
        return float(v @ self.coef), self.s * math.sqrt(1 + h)


def fit_ratio(kind: str, ys: np.ndarray, X: np.ndarray, fams: list[str], names: list[str]) -> RatioRule:
    """A ratio rule of `kind` on training rows ys (log2 ρ), features X (columns named by `names`)."""
    k = len(ys)
    if kind == "const":
        per = {f: ys[[i for i, g in enumerate(fams) if g == f]].mean() for f in dict.fromkeys(fams)}
        c = float(np.mean(list(per.values())))  # each family counts once
        if k < 2:  # a value, but no spread: a prediction without an interval
            return RatioRule(kind, np.array([c]), [], math.nan, 0, np.array([[1.0]]))
        s = float(np.sqrt(((ys - c) ** 2).sum() / (k - 1)))
        return RatioRule(kind, np.array([c]), [], s, k - 1, np.array([[1 / k]]))
    want = [i for i, n in enumerate(names) if kind == "all" or n.split("=")[0] == kind]
    cols = [i for i in want if np.ptp(X[:, i]) > 1e-9]  # constant over training: no information
    if not cols:
        return fit_ratio("const", ys, X, fams, names) if kind != "const" else None
    Z = X[:, cols]
    mean = sd = None
    if kind == "all":
        mean, sd = Z.mean(0), Z.std(0)
        Z = (Z - mean) / sd
    A = np.column_stack([np.ones(k), Z])
    pen = np.diag([0.0] + [RIDGE if kind == "all" else 0.0] * len(cols))
    M = A.T @ A + pen
    if np.linalg.matrix_rank(M) < M.shape[0]:
        return RatioRule(kind, None, cols, math.nan, 0, None)
    Minv = np.linalg.inv(M)
    coef = Minv @ A.T @ ys
    hat = A @ Minv @ A.T
    dof = k - float(np.trace(hat))
    s = float(np.sqrt(((ys - A @ coef) ** 2).sum() / dof)) if dof >= 1 else math.nan
    cov = Minv @ A.T @ A @ Minv
    return RatioRule(kind, coef, cols, s, dof, cov, mean, sd)


def _reml(ys: np.ndarray, vs: np.ndarray, A: np.ndarray) -> float:
    """τ², the between-workload variance of the true log2 ρ about x'β, by restricted maximum likelihood."""

    def nll(tau2: float) -> float:
        w = 1 / (vs + tau2)
        M = A.T @ (A * w[:, None])
        beta = np.linalg.solve(M, A.T @ (w * ys))
        r = ys - A @ beta
        return float(np.log(vs + tau2).sum() + np.linalg.slogdet(M)[1] + (w * r * r).sum())

    return float(optimize.minimize_scalar(nll, bounds=(0.0, 4.0), method="bounded").x)


def fit_meta(kind: str, data: RatioData, names: list[str]) -> RatioRule | None:
    """The `meta` interval's rule (docs/validation.md, third run): random-effects meta-regression of log2 ρ on
    `kind`'s features, each workload's known variance counted once; `s` is τ and `cov` Cov(β) itself."""
    ys, vs, X, fams, k = data.ys, data.vs, data.X, data.fams, len(data.ys)
    cols = [] if kind == "const" else [i for i, n in enumerate(names) if n.split("=")[0] == kind]
    cols = [i for i in cols if np.ptp(X[:, i]) > 1e-9]
    A = np.column_stack([np.ones(k), X[:, cols]])
    if k < A.shape[1] + 1 or np.linalg.matrix_rank(A) < A.shape[1]:
        return None
    tau2 = _reml(ys, vs, A)
    w = 1 / (vs + tau2)
    if not cols:  # each family counts once, as for the residual constant
        n_f = {f: fams.count(f) for f in fams}
        a = w / np.array([n_f[f] for f in fams])
        c = float((a * ys).sum() / a.sum())
        var = float((a * a / w).sum() / a.sum() ** 2)
        return RatioRule("const", np.array([c]), [], math.sqrt(tau2), k - 1, np.array([[var]]), interval="meta")
    cov = np.linalg.inv(A.T @ (A * w[:, None]))
    beta = cov @ A.T @ (w * ys)
    return RatioRule(kind, beta, cols, math.sqrt(tau2), k - A.shape[1], cov, interval="meta")


def _t(dof: float) -> float:
    return float(stats.t.ppf(0.975, dof))


def _row(w: Workload, what: str, pred: float, truth: float, se: float | None, dof: float | None,
         truth_se: float = 0.0, **kw) -> dict:  # fmt: skip
    """One scored prediction. An interval for the *true* optimum (`truth_se` > 0, the `meta` intervals) covers
    the measured one when the error is within the interval widened by the measurement's own SE ("covered");
    "covered_raw" checks the interval itself."""
    q = math.inf if se is None or dof is None or not dof >= 1 else _t(dof) if dof < 1e6 else Z95
    half = q * se if math.isfinite(q) else math.inf
    err = pred - truth
    return {"workload": w.name, "family": w.family, "rule": what, "pred": pred, "truth": truth, "err": err,
            "half": half, "covered": bool(math.isfinite(half) and abs(err) <= q * math.hypot(se, truth_se)),
            "covered_raw": bool(math.isfinite(half) and abs(err) <= half),
            "width_x": 2 ** (2 * half) if math.isfinite(half) else math.inf,
            **kw}  # fmt: skip


# ---------------------------------------------------------------- leave one family out


def _ratio_table(ws: list[Workload], fold: Fold, anchor: str, tasks: list[str]) -> RatioData:
    """Per training workload with an anchor and a measured full-ft η*: log2 ρ, its variance, features, family."""
    ys, vs, xs, fams = [], [], [], []
    for w in ws:
        t = full_truth(w)
        b1 = fold.regime(w.source, "B:1")
        a = anchor_value(b1, anchor) if b1 is not None and b1.ranks_used else None
        if t is None or a is None:
            continue
        ys.append(a[0] - t[0])
        vs.append(a[1] ** 2 + t[1] ** 2)
        xs.append(np.concatenate(list(features(w, b1, tasks).values())))
        fams.append(w.family)
    return RatioData(np.array(ys), np.array(vs), np.array(xs).reshape(len(ys), -1), fams)


@dataclass
class RatioData:
    """Training workloads' log2 ρ, its known measurement variance (anchor's SE² + full-ft η*'s SE²), features."""

    ys: np.ndarray
    vs: np.ndarray
    X: np.ndarray
    fams: list[str]


def feature_names(tasks: list[str]) -> list[str]:
    return ["slope", "width", "depth", "steps"] + [f"task={t}" for t in tasks[1:]]


def score_full(workloads: list[Workload]) -> pd.DataFrame:
    """Every --to full-ft candidate, leave one family out: one row per (held-out workload, candidate)."""
    tasks = sorted({w.task for w in workloads})
    names = feature_names(tasks)
    rows = []
    for fam in sorted({w.family for w in workloads}):
        test = [w for w in workloads if w.family == fam]
        fold = Fold.of([w for w in workloads if w.family != fam])
        rules = {}
        for anchor in ANCHORS:
            data = _ratio_table(fold.train, fold, anchor, tasks)
            for kind in RATIOS:
                rules[anchor, kind] = fit_ratio(kind, data.ys, data.X, data.fams, names) if len(data.ys) else None
                if kind != "all":
                    rules[anchor, kind + META] = fit_meta(kind, data, names) if len(data.ys) else None
        proxy_d = [full_truth(w)[0] - w.proxy.full.log2_lr_star for w in fold.train
                   if w.proxy is not None and full_truth(w) and w.proxy.full and w.proxy.full.usable]  # fmt: skip
        for w in test:
            t = full_truth(w)
            b1 = fold.regime(w.source, "B:1")
            if t is None or b1 is None or not b1.ranks_used:
                continue
            x = np.concatenate(list(features(w, b1, tasks).values()))
            gate = None  # GATE_RULE's (prediction, se, dof, truth's se) for this workload
            for (anchor, kind), rule in rules.items():
                a = anchor_value(b1, anchor)
                r = rule.predict(x) if rule is not None else None
                name = f"{anchor} ÷ {kind}"
                if a is None or r is None:
                    rows.append({**_row(w, name, math.nan, t[0], None, None), "err": math.inf, "covered": False})
                    continue
                se = math.sqrt(a[1] ** 2 + r[1] ** 2) if rule.dof >= 1 else None
                t_se = t[1] if rule.interval == "meta" else 0.0
                rows.append(_row(w, name, a[0] - r[0], t[0], se, rule.dof, t_se, anchor=anchor, ratio=kind))
                if name == GATE_RULE:
                    gate = (a[0] - r[0], se, rule.dof, t_se, rows[-1]["half"])
            c, c_se = b1.line(b1.centre_x, "mua")
            rows.append(_row(w, "muA-B:1 (ratio 1)", c, t[0], c_se, 1e9, anchor="pooled", ratio="1"))
            ref = anchor_value(b1, "line16")
            proxy = PROXIES.get(w.name)
            pw = next((o for o in workloads if o.name == proxy), None)
            if pw is not None and pw.fit.full_vs_b1 is not None:
                off = -math.log2(pw.fit.full_vs_b1.ratio)
                se = math.hypot(ref[1], cal.CALIBRATE_SD)
                rows.append(_row(w, "calibrated (older --calibrate)", ref[0] + off, t[0], se, 1e9))
            if w.proxy is not None and w.proxy.full is not None and w.proxy.full.usable:
                p, p_se = w.proxy.full.log2_lr_star, w.proxy.full.se_log2
                k = len(proxy_d)
                rms = float(np.sqrt(np.mean(np.square(proxy_d)))) if k else None
                rows.append(_row(w, "proxy-direct", p, t[0], math.hypot(p_se, rms) if k else None, k or None))
                if gate is not None:  # the fourth run: the check where it lies inside the shipped interval
                    centre, g_se, g_dof, g_tse, g_half = gate
                    inside = math.isfinite(g_half) and abs(p - centre) <= g_half
                    rows.append(_row(w, "check-gated", p if inside else centre, t[0], g_se, g_dof, g_tse,
                                     check_inside=inside))  # fmt: skip
                if k >= 2:
                    m, sd = float(np.mean(proxy_d)), float(np.std(proxy_d, ddof=1))
                    rows.append(
                        _row(w, "proxy-scaled", p + m, t[0], math.hypot(p_se, sd * math.sqrt(1 + 1 / k)), k - 1)
                    )
                else:
                    rows.append({**_row(w, "proxy-scaled", math.nan, t[0], None, None), "err": math.inf})
            if t is not None and w.fit.full is not None:
                best = min(p["mean_metric"] for p in w.fit.full.points if p["mean_metric"] is not None)
                for r in rows:
                    if r["workload"] == w.name and "loss_gap" not in r:
                        r["loss_gap"] = loss_at(w, r["pred"]) / best - 1 if math.isfinite(r["pred"]) else math.inf
    return pd.DataFrame(rows)


def _rank_pred(rule: str, rf: RegimeFit, straight: RegimeFit, target: int) -> tuple[float, float] | None:
    x0 = math.log2(target)
    if rule == "line":
        return rf.line(x0, "shrunk")
    if rule == "line-measured":
        return rf.line(x0, "measured") if rf.line_slope is not None else None
    if rule == "line-straight":
        return straight.line(x0, "shrunk")
    if rule == "muA-pooled":
        return rf.line(x0, "mua")
    last = rf.ranks_used[-1]
    return rf.log2_lr_stars[-1] + rf.expected_slope * (x0 - math.log2(last)), rf.se_log2s[-1]


def _rank_cases(w: Workload):
    """(regime, target rank, its measured log2 η*) for A:r and B:1: the largest usable rank, ≥ 2 below it."""
    for name in ("A:r", "B:1"):
        use = [o for o in w.fit.optima_for(name) if o.usable]
        if len(use) >= 3:
            yield name, use[-1].rank, use[-1].log2_lr_star


def _rank_preds(w: Workload, fold: Fold):
    for name, target, truth in _rank_cases(w):
        src = w.fit_below(target)
        rf, straight = fold.regime(src, name), fold.regime(src, name, curved=False)
        if rf is None or len(rf.ranks_used) < 2:
            continue
        for rule in RANK_RULES:
            p = _rank_pred(rule, rf, straight, target)
            yield name, target, truth, rule, p


def rank_excess(fold: Fold) -> dict[str, float]:
    """Per rule: how far its own SE fell short on the fold's training workloads, mean(err² − se²) floored at 0."""
    excess: dict[str, list[float]] = {r: [] for r in RANK_RULES}
    for o in fold.train:
        for _, _, truth, rule, p in _rank_preds(o, fold):
            if p is not None:
                excess[rule].append((p[0] - truth) ** 2 - p[1] ** 2)
    return {r: max(float(np.mean(v)), 0.0) if v else 0.0 for r, v in excess.items()}


def score_rank(workloads: list[Workload]) -> pd.DataFrame:
    """--to RANK: each workload's largest measured rank from its smaller ones, leave one family out."""
    rows = []
    for fam in sorted({w.family for w in workloads}):
        fold = Fold.of([w for w in workloads if w.family != fam])
        extra = rank_excess(fold)
        for w in (w for w in workloads if w.family == fam):
            for name, target, truth, rule, p in _rank_preds(w, fold):
                if p is None:
                    rows.append({**_row(w, rule, math.nan, truth, None, None), "err": math.inf, "regime": name,
                                 "target": target})  # fmt: skip
                    continue
                rows.append(_row(w, rule, p[0], truth, math.sqrt(p[1] ** 2 + extra[rule]), 1e9, regime=name,
                                 target=target))  # fmt: skip
    return pd.DataFrame(rows)


ANCHOR_ORDER = {a: i for i, a in enumerate(ANCHORS)}
RATIO_ORDER = {r: (0 if r == "const" else 2 if r == "all" else 1) for r in RATIOS}


def winner(rows: pd.DataFrame, candidates: list[str], simplicity) -> str:
    """The pre-registered choice: most within √2, then most covered, then the smaller median width, then simpler."""

    def key(rule):
        g = rows[rows["rule"] == rule]
        return (-int((g["err"].abs() <= 0.5).sum()), -int(g["covered"].sum()), float(g["width_x"].median()),
                simplicity(rule))  # fmt: skip

    return min(candidates, key=key)


def full_winner(rows: pd.DataFrame) -> str:
    cands = [f"{a} ÷ {k}{m}" for m in ("", META) for a in ANCHORS for k in RATIOS]

    def simple(rule):
        a, k = rule.removesuffix(META).split(" ÷ ")
        return rule.endswith(META), RATIO_ORDER[k], ANCHOR_ORDER[a]

    return winner(rows, [c for c in cands if c in set(rows["rule"])], simple)


def rank_winner(rows: pd.DataFrame) -> str:
    return winner(rows, [r for r in RANK_RULES if r in set(rows["rule"])], RANK_RULES.index)


RANK_BASIS = {"line": "shrunk-slope", "line-measured": "measured-slope", "muA-pooled": "muA-slope"}  # mua's names
RULE_OF_BASIS = {v: k for k, v in RANK_BASIS.items()}


SHIPPABLE = ("slope", "steps", "task=")  # features a run records (width and depth it does not)


def ratio_model(rule: RatioRule, names: list[str]) -> dict | None:
    """calibration.B1_OVER_FULL_MODEL for a fitted ratio model; None for the constant."""
    if rule.coef is None or rule.cov is None or (rule.interval != "meta" and rule.cov.shape[0] == 1):
        return None
    cols = [names[i] for i in rule.cols]
    r = lambda a: None if a is None else np.round(np.asarray(a, float), 5).tolist()  # noqa: E731
    return {"kind": rule.kind, "interval": rule.interval, "columns": cols, "coef": r(rule.coef),
            "cov": r(rule.cov), "s": round(rule.s, 4), "dof": round(float(rule.dof), 3), "mean": r(rule.mean),
            "sd": r(rule.sd)}  # fmt: skip


def constants(workloads: list[Workload], full_rule: str | None = None, rank_rule: str | None = None) -> dict:
    """The values of mua_cli/science/calibration.py that these workloads support, for the chosen rules.

    A ratio model that needs a feature a run does not record (width, depth) cannot ship: then the constant
    ratio on the same anchor ships, and `shipped` says so."""
    rule = full_rule or f"{cal.FULL_ANCHOR} ÷ const"
    anchor, kind = rule.removesuffix(META).split(" ÷ ")
    fold = Fold.of(workloads)
    tasks = sorted({w.task for w in workloads})
    names = feature_names(tasks)
    data = _ratio_table(workloads, fold, anchor, tasks)
    ys, X, fams = data.ys, data.X, data.fams
    const = fit_ratio("const", ys, X, fams, names)
    if rule.endswith(META):
        model = ratio_model(fit_meta(kind, data, names), names)
    else:
        model = ratio_model(fit_ratio(kind, ys, X, fams, names), names) if kind != "const" else None
    if model and not all(c.startswith(SHIPPABLE) for c in model["columns"]):
        model = None
    return {
        "SLOPE_PRIOR_SD": round(fold.prior, 3),
        "RANK_SCATTER_FLOOR": round(max(rank_scatter(workloads), 0.05), 3),
        "FULL_ANCHOR": anchor,
        "B1_OVER_FULL_LOG2": round(float(const.coef[0]), 3),
        "B1_OVER_FULL_SD": round(const.s, 3),
        "B1_OVER_FULL_N": len(ys),
        "B1_OVER_FULL_FAMILIES": len(set(fams)),
        "B1_OVER_FULL_MODEL": model,
        "RANK_CURVATURE": fold.curv,
        "RANK_BASIS": RANK_BASIS.get(rank_rule or RULE_OF_BASIS[cal.RANK_BASIS], rank_rule),
        "RANK_EXTRA_SD": {
            RANK_BASIS[r]: round(math.sqrt(v), 3) for r, v in rank_excess(fold).items() if r in RANK_BASIS
        },
    }


def score(workloads: list[Workload]) -> dict:
    return {"full": score_full(workloads), "rank": score_rank(workloads)}


def summary(rows: pd.DataFrame, by: str = "rule") -> pd.DataFrame:
    """One line per candidate, best first by the pre-registered order (within √2, covered, median width)."""
    if rows.empty:
        return rows
    g = rows.groupby(by, sort=False)
    out = pd.DataFrame(
        {
            "n": g.size(),
            "within √2": g["err"].apply(lambda e: int((e.abs() <= 0.5).sum())),
            "median error (×)": g["err"].apply(lambda e: f"{2 ** e.abs().median():.2f}"),
            "worst (×)": g["err"].apply(lambda e: f"{2 ** e.abs().max():.2f}"),
            "95 % covers": g["covered"].apply(lambda c: int(c.sum())),
            "covers, raw": g["covered_raw"].apply(lambda c: f"{int(c.sum())}/{len(c)}"),
            "median width (×)": g["width_x"].median(),
        }
    )
    if "loss_gap" in rows:
        out["loss within 1 %"] = g["loss_gap"].apply(lambda v: f"{int((v <= 0.01).sum())}/{len(v)}")
    out = out.sort_values(
        ["within √2", "95 % covers", "median width (×)"], ascending=[False, False, True], kind="stable"
    )
    out["within √2"] = [f"{v}/{n}" for v, n in zip(out["within √2"], out["n"], strict=True)]
    out["95 % covers"] = [f"{v}/{n}" for v, n in zip(out["95 % covers"], out["n"], strict=True)]
    out["median width (×)"] = [f"{v:.2f}" if math.isfinite(v) else "no interval" for v in out["median width (×)"]]
    return out.reset_index()


def md(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows)\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def exponent_table(workloads: list[Workload]) -> pd.DataFrame:
    rows = []
    for w in workloads:
        for name in REGIMES:
            rf = w.fit.regimes.get(name)
            if rf is None:
                continue
            rows.append(
                {"workload": w.name, "regime": name, "ranks used": ",".join(map(str, rf.ranks_used)) or "—",
                 "measured slope": "—" if rf.slope is None else f"{rf.slope:+.2f}",
                 "95 % interval": "—" if not rf.slope_interval else
                 f"[{rf.slope_interval[0]:+.2f}, {rf.slope_interval[1]:+.2f}]",
                 "μA": f"{rf.expected_slope:+g}",
                 "holds": {"consistent": "yes", "inconsistent": "no"}.get(rf.verdict, "—")}
            )  # fmt: skip
    return pd.DataFrame(rows)


def ratio_table(workloads: list[Workload], anchor: str) -> pd.DataFrame:
    rows = []
    for w in workloads:
        t, b1 = full_truth(w), w.source.regimes.get("B:1")
        a = anchor_value(b1, anchor) if b1 is not None else None
        if t is None or a is None:
            continue
        r, half = a[0] - t[0], Z95 * math.hypot(a[1], t[1])
        rows.append(
            {"workload": w.name, "family": w.family, "task": w.task, "width": w.width, "depth": w.depth,
             "steps": w.steps, f"B:1 η* ({anchor})": f"{2 ** a[0]:.3g}", "full-ft η*": f"{2 ** t[0]:.3g}",
             "B:1 / full": f"{2**r:.2f}", "95 % interval": f"[{2 ** (r - half):.2f}, {2 ** (r + half):.2f}]",
             "B:1 slope (ranks ≤ 64)": "—" if b1.slope is None else f"{b1.slope:+.2f}"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def width_table(workloads: list[Workload]) -> pd.DataFrame:
    """η* at rank 16 (and full-ft) against width over the embedded family: the width exponent per regime."""
    fam = [w for w in workloads if w.meta.get("model") == "embedded:tiny" and w.name.startswith("w") and "-s" not in
           w.name]  # fmt: skip
    if len(fam) < 2:
        return pd.DataFrame()
    rows = []
    for name in [*REGIMES, "full"]:
        xs, ys = [], []
        for w in fam:
            if name == "full":
                v = (full_truth(w) or (None,))[0]
            else:
                rf = w.fit.regimes.get(name)
                v = rf.line(math.log2(16))[0] if rf is not None and rf.ranks_used else None
            if v is not None:
                xs.append(math.log2(w.width))
                ys.append(v)
        if len(xs) >= 2:
            slope = float(np.polyfit(xs, ys, 1)[0])
            expected = -1.0 if name in ("full",) or name.startswith("B") else -0.5
            rows.append({"regime": name, "widths": len(xs), "measured width exponent": f"{slope:+.2f}",
                         "μA": f"{expected:+g}"})  # fmt: skip
    return pd.DataFrame(rows)


def plots(workloads: list[Workload], scored: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    n = len(workloads)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for name, color in (("A:r", "tab:blue"), ("B:1", "tab:orange")):
            ops = [o for o in w.fit.optima_for(name) if o.usable]
            if ops:
                r = [o.rank for o in ops]
                ax.errorbar(r, [o.lr_star for o in ops], yerr=[[o.lr_star - o.lo for o in ops],
                            [o.hi - o.lr_star for o in ops]], fmt="o-", color=color, capsize=3, label=name)  # fmt: skip
        if full_truth(w) is not None:
            f = w.fit.full
            ax.axhspan(f.lo, f.hi, color="red", alpha=0.15)
            ax.axhline(f.lr_star, color="red", ls=":", label="full FT")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(w.name, fontsize=9)
        ax.set_xlabel("rank")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("η*")
    fig.tight_layout()
    p = out / "validation_optima.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    full = scored["full"]
    if not full.empty:
        fig, ax = plt.subplots(figsize=(5, 4))
        for rule, g in full.groupby("rule"):
            ax.errorbar(2 ** g["truth"], 2 ** g["pred"], yerr=None, fmt="o", label=rule)
        lim = [2 ** (full[["truth", "pred"]].min().min() - 1), 2 ** (full[["truth", "pred"]].max().max() + 1)]
        ax.plot(lim, lim, "k-", lw=0.8)
        ax.fill_between(lim, [v / 2**0.5 for v in lim], [v * 2**0.5 for v in lim], color="grey", alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("measured full-FT η*")
        ax.set_ylabel("predicted (leave one family out)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "validation_full_ft.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def shipped_note(winner: str, consts: dict) -> str:
    kind = winner.split(" ÷ ")[1]
    if kind == "const" or consts["B1_OVER_FULL_MODEL"]:
        return ""
    return (
        f" mua ships `{consts['FULL_ANCHOR']} ÷ const` instead: the winner's model needs a feature a run does not "
        f"record (width, depth)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where the tables (validation_tables.md) go")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the study's results folder")
    ap.add_argument("--workloads", help="comma-separated: score only these (e.g. the first study's six)")
    ap.add_argument("--write-calibration", action="store_true", help="write the constants into calibration.py")
    args = ap.parse_args()
    workloads = load_all(args.results)
    if args.workloads:
        keep = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.name in keep]
    if not workloads:
        sys.exit(f"no study results under {args.results}")
    for w in workloads:  # each workload's fit as `mua fit` writes it, kept beside its trials
        (args.results / w.name / "fit.json").write_text(json.dumps(w.fit.to_dict(), indent=2, allow_nan=False) + "\n")
    scored = score(workloads)
    full, rank = scored["full"], scored["rank"]
    fw, rw = full_winner(full), rank_winner(rank)
    consts = constants(workloads, fw, rw)
    fams = sorted({w.family for w in workloads})
    shown = [fw, *EARLIER_WINNERS, "line16 ÷ const", "cell16 ÷ const", "pooled ÷ const", "muA-B:1 (ratio 1)",
             "calibrated (older --calibrate)", "proxy-direct", "proxy-scaled", "check-gated"]  # fmt: skip
    proxied = sorted(set(full.loc[full["rule"].str.startswith("proxy"), "workload"]))
    parts = [
        f"{len(workloads)} workloads, {len(fams)} families ({', '.join(fams)}).\n\n",
        "## Calibration constants the whole study supports (mua_cli/science/calibration.py)\n",
        "```\n" + "\n".join(f"{k} = {v}" for k, v in consts.items()) + "\n```\n",
        "## `--to full-ft`, leave one family out (B:1 ranks ≤ 64 → measured full-ft η*)\n\n",
        f"Winner by the pre-registered order (within √2, then covered, then median width, then simpler): "
        f"**{fw}**.{shipped_note(fw, consts)} Every candidate, best first (a candidate without an interval counts as "
        f"not covered):\n\n",
        md(summary(full)),
        "\nThe winner by held-out family:\n\n",
        md(summary(full[full["rule"] == fw], by="family")),
        "\nProxy calibration against the winner, on the workloads that have a proxy run"
        f" ({', '.join(proxied) or 'none in this study'}):\n\n",
        md(
            summary(
                full[
                    full["workload"].isin(proxied)
                    & full["rule"].isin([fw, *EARLIER_WINNERS, "proxy-direct", "proxy-scaled", "check-gated"])
                ]
            )
        ),  # fmt: skip
        "\nPer workload (log2 error: predicted − measured; ± the 95 % half-width):\n\n",
        md(_fmt_rows(full[full["rule"].isin(shown)])),
        "\n## `--to RANK`: the largest measured rank from the smaller ones, leave one family out\n\n",
        f"Winner by the same order: **{rw}**.\n\n",
        md(summary(rank)),
        "\nPer workload and regime:\n\n",
        md(_fmt_rows(rank)),
        f"\n## B:1 / full-finetuning ratio per workload (B:1 read as `{consts['FULL_ANCHOR']}`)\n",
        md(ratio_table(workloads, consts["FULL_ANCHOR"])),
        "\n## Rank exponents, measured against μA's (every rank of each workload)\n",
        md(exponent_table(workloads)),
        "\n## Width exponents over the embedded family (η* at rank 16; full finetuning)\n",
        md(width_table(workloads)),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation_tables.md").write_text(
        "<!-- generated by `python studies/report.py`; do not edit by hand -->\n# Study tables\n\n" + "".join(parts)
    )
    plots(workloads, {"full": full[full["rule"].isin(shown)], "rank": rank}, args.out)
    if args.write_calibration:
        write_calibration(consts)
    print("".join(parts))


def write_calibration(consts: dict, path: Path = REPO / "mua_cli" / "science" / "calibration.py") -> None:
    """Replace each constant's assignment in calibration.py (a multi-line dict included) with the study's value."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        key = line.split(" ", 1)[0].split(":")[0]
        if key in consts and (" = " in line):
            head = line.split(" = ", 1)[0]
            if line.rstrip().endswith("{"):  # a dict over several lines: skip to its closing brace
                while lines[i].strip() != "}":
                    i += 1
            out.append(f"{head} = {consts[key]!r}")
        else:
            out.append(line)
        i += 1
    path.write_text("\n".join(out) + "\n")
    import subprocess

    subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(path)], check=False)


def _fmt_rows(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return rows
    out = rows[[c for c in ("workload", "family", "regime", "target", "rule") if c in rows]].copy()
    out["predicted"] = [f"{2**v:.3g}" if math.isfinite(v) else "—" for v in rows["pred"]]
    out["measured"] = [f"{2**v:.3g}" for v in rows["truth"]]
    out["error (log2)"] = [
        "no prediction"
        if not math.isfinite(e)
        else f"{e:+.2f} ± {h:.2f}"
        if math.isfinite(h)
        else f"{e:+.2f}, no interval"
        for e, h in zip(rows["err"], rows["half"], strict=True)
    ]
    out["covered"] = rows["covered"].map({True: "yes", False: "no"})
    if "loss_gap" in rows:
        out["loss vs best"] = [f"{100 * v:+.2f} %" if math.isfinite(v) else "—" for v in rows["loss_gap"]]
    return out


if __name__ == "__main__":
    main()
