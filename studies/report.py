#!/usr/bin/env python3
"""Score mua's prediction rules on the kept study results, leave-one-workload-out, and write docs/validation.md.

Reads studies/results/<workload>/{trials.csv,recipe.yaml,meta.json} (written by transfer_study.py on the GPU),
fits every workload with mua's own `fit_run`, and for each workload predicts what it measured from what the
others measured:
- full finetuning from its B:1 ranks 4–64: μA's raw rule, the study offset (learned on the other workloads),
  a proxy calibration (`--calibrate`) where the study has a proxy, and B:1's line extrapolated to rank = width;
- rank 256 from ranks 4–64: the shrunk slope (prior width learned on the other workloads), the measured
  slope alone, and μA's slope.
It prints the calibration constants (mua_cli/science/calibration.py) the whole study supports, writes each workload's
fit.json beside its trials, and renders the tables (docs/validation_tables.md) and plots of docs/validation.md.
No GPU: `python studies/report.py` re-renders everything from the kept files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mua_cli.science import calibration as cal  # noqa: E402
from mua_cli.science.fit import FitResult, fit_run  # noqa: E402
from mua_cli.science.rank_optima import Z95  # noqa: E402
from mua_cli.science.theory import REGIMES  # noqa: E402

RESULTS = REPO / "studies" / "results"
SOURCE_RANKS = (4, 16, 64)
TARGET_RANK = 256
# proxy → target pairs for `--calibrate`: fewer steps of the same model, a narrower model of the same family
PROXIES = {"w512": "w512-s100", "w1024": "w512"}


@dataclass
class Workload:
    name: str
    meta: dict
    df: pd.DataFrame
    fit: FitResult  # every rank
    source: FitResult  # ranks 4–64 and full-ft trials removed: what a user who did not measure would have
    extra: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.meta.get("width") or 0)


def load(folder: Path, prior_sd: float = cal.SLOPE_PRIOR_SD) -> Workload:
    name = folder.name
    df = pd.read_csv(folder / "trials.csv")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    df["recipe"] = [recipe] * len(df)
    meta = json.loads((folder / "meta.json").read_text())
    return Workload(name, meta, df, fit_run(df, prior_sd), _source_fit(df, prior_sd))


def _source_fit(df: pd.DataFrame, prior_sd: float) -> FitResult:
    keep = df["rank"].isin(SOURCE_RANKS) & (df["regime"] != "full")
    return fit_run(df[keep], prior_sd)


def b1_ref(fit: FitResult) -> tuple[float, float]:
    return fit.regimes["B:1"].line(math.log2(cal.FULL_REF_RANK))


def full_truth(w: Workload) -> float | None:
    return w.fit.full.log2_lr_star if w.fit.full is not None and w.fit.full.usable else None


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


def offsets(workloads: list[Workload]) -> dict[str, float]:
    out = {}
    for w in workloads:
        t = full_truth(w)
        if t is not None and "B:1" in w.source.regimes and w.source.regimes["B:1"].ranks_used:
            out[w.name] = t - b1_ref(w.source)[0]
    return out


def constants(workloads: list[Workload]) -> dict:
    """The values of mua_cli/science/calibration.py that these workloads support."""
    offs = list(offsets(workloads).values())
    return {
        "SLOPE_PRIOR_SD": round(slope_prior(workloads), 3),
        "RANK_SCATTER_FLOOR": round(max(rank_scatter(workloads), 0.05), 3),
        "FULL_OFFSET_LOG2": round(float(np.mean(offs)), 3) if offs else None,
        "FULL_OFFSET_SD": round(float(np.std(offs, ddof=1)), 3) if len(offs) > 1 else None,
        "FULL_OFFSET_N": len(offs),
        "RANK_CURVATURE": curvatures(workloads),
    }


def load_all(res: Path = RESULTS) -> list[Workload]:
    names = sorted(p.name for p in res.iterdir() if (p / "trials.csv").is_file()) if res.is_dir() else []
    return [load(res / n) for n in names]


def score(workloads: list[Workload]) -> dict:
    """Leave-one-workload-out predictions of full-ft and rank-256 optima; rows for the tables."""
    offs = offsets(workloads)
    full_rows, rank_rows = [], []
    for w in workloads:
        others = [o for o in workloads if o.name != w.name]
        prior = slope_prior(others)
        saved, cal.RANK_CURVATURE = cal.RANK_CURVATURE, {}
        straight = _source_fit(w.df, prior)  # the ablation: no rank curvature
        cal.RANK_CURVATURE = curvatures(others)
        src = _source_fit(w.df, prior)
        cal.RANK_CURVATURE = saved
        t = full_truth(w)
        b1 = src.regimes.get("B:1")
        if t is not None and b1 is not None and b1.ranks_used:
            ref, ref_se = b1.line(math.log2(cal.FULL_REF_RANK))
            other_offs = [v for k, v in offs.items() if k != w.name]
            mu, sd = float(np.mean(other_offs)), float(np.std(other_offs, ddof=1)) if len(other_offs) > 1 else 1.0
            rules = {
                "muA-B:1": b1.line(b1.centre_x, "mua"),
                "study-offset": (ref + mu, math.sqrt(ref_se**2 + sd**2)),
            }
            if w.width:
                rules["B:1 at r = width"] = b1.line(math.log2(w.width))
            proxy = PROXIES.get(w.name)
            if proxy in offs:
                rules["calibrated"] = (ref + offs[proxy], math.sqrt(ref_se**2 + cal.CALIBRATE_SD**2))
            best = min(p["mean_metric"] for p in w.fit.full.points if p["mean_metric"] is not None)
            for rule, (c, se) in rules.items():
                loss = loss_at(w, c)
                full_rows.append(
                    {"workload": w.name, "rule": rule, "pred": c, "truth": t, "err": c - t, "se": se,
                     "covered": abs(c - t) <= Z95 * se, "width_x": 2 ** (2 * Z95 * se),
                     "loss_gap": loss / best - 1}
                )  # fmt: skip
        for name in ("A:r", "B:1"):
            truth_o = next((o for o in w.fit.optima_for(name) if o.rank == TARGET_RANK and o.usable), None)
            rf = src.regimes.get(name)
            if truth_o is None or rf is None or len(rf.ranks_used) < 2:
                continue
            x0 = math.log2(TARGET_RANK)
            rules = (("shrunk-slope", "shrunk", rf), ("measured-slope", "measured", rf), ("muA-slope", "mua", rf),
                     ("shrunk-slope, no curvature", "shrunk", straight.regimes[name]))  # fmt: skip
            for rule, slope, line in rules:
                c, se = line.line(x0, slope)
                rank_rows.append(
                    {"workload": w.name, "regime": name, "rule": rule, "pred": c, "truth": truth_o.log2_lr_star,
                     "err": c - truth_o.log2_lr_star, "se": se, "covered": abs(c - truth_o.log2_lr_star) <= Z95 * se,
                     "width_x": 2 ** (2 * Z95 * se)}
                )  # fmt: skip
    return {"full": pd.DataFrame(full_rows), "rank": pd.DataFrame(rank_rows), "offsets": offs}


def summary(rows: pd.DataFrame, by: str = "rule") -> pd.DataFrame:
    if rows.empty:
        return rows
    g = rows.groupby(by)
    out = pd.DataFrame(
        {
            "n": g.size(),
            "within √2": g["err"].apply(lambda e: f"{int((e.abs() <= 0.5).sum())}/{len(e)}"),
            "median |error| (×)": g["err"].apply(lambda e: f"{2 ** e.abs().median():.2f}"),
            "worst (×)": g["err"].apply(lambda e: f"{2 ** e.abs().max():.2f}"),
            "95 % covers": g["covered"].apply(lambda c: f"{int(c.sum())}/{len(c)}"),
            "median interval width (×)": g["width_x"].apply(lambda v: f"{v.median():.2f}"),
        }
    )
    if "loss_gap" in rows:
        out["loss within 1 %"] = g["loss_gap"].apply(lambda v: f"{int((v <= 0.01).sum())}/{len(v)}")
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


def ratio_table(workloads: list[Workload]) -> pd.DataFrame:
    rows = []
    for w in workloads:
        c = w.fit.full_vs_b1
        if c is None:
            continue
        rows.append(
            {"workload": w.name, "task": w.meta.get("task"), "width": w.width, "steps": w.meta.get("steps") or
             int(w.df["steps"].iloc[0]), f"B:1 η* (r={c.ref_rank})": f"{c.b1_lr:.3g}", "full-ft η*": f"{c.full_lr:.3g}",
             "B:1 / full": f"{c.ratio:.2f}", "95 % interval": f"[{c.ratio_interval[0]:.2f}, {c.ratio_interval[1]:.2f}]",
             "B:1 slope": "—" if w.fit.regimes["B:1"].slope is None else f"{w.fit.regimes['B:1'].slope:+.2f}"}
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
                v = full_truth(w)
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
        ax.set_ylabel("predicted (leave-one-workload-out)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "validation_full_ft.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where the tables (validation_tables.md) go")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the study's results folder")
    args = ap.parse_args()
    res = args.results
    names = sorted(p.name for p in res.iterdir() if (p / "trials.csv").is_file()) if res.is_dir() else []
    if not names:
        sys.exit(f"no study results under {res}")
    workloads = [load(res / n) for n in names]
    for w in workloads:  # each workload's fit as `mua fit` writes it, kept beside its trials
        (res / w.name / "fit.json").write_text(json.dumps(w.fit.to_dict(), indent=2, allow_nan=False) + "\n")
    scored = score(workloads)
    consts = constants(workloads)
    parts = [
        "## Calibration constants the whole study supports (mua_cli/science/calibration.py)\n",
        "```\n" + "\n".join(f"{k} = {v}" for k, v in consts.items()) + "\n```\n",
        "## Full finetuning, leave-one-workload-out (B:1 ranks 4–64 → measured full-ft η*)\n",
        md(summary(scored["full"])),
        "\nPer workload (log2 error: predicted − measured; ± is the 95 % half-width):\n\n",
        md(_fmt_rows(scored["full"])),
        f"\n## Rank {TARGET_RANK} from ranks 4–64, leave-one-workload-out prior\n",
        md(summary(scored["rank"])),
        "\nPer workload and regime:\n\n",
        md(_fmt_rows(scored["rank"])),
        "\n## B:1 / full-finetuning ratio per workload\n",
        md(ratio_table(workloads)),
        "\n## Rank exponents, measured against μA's (every rank of each workload)\n",
        md(exponent_table(workloads)),
        "\n## Width exponents over the embedded family (η* at rank 16; full finetuning)\n",
        md(width_table(workloads)),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation_tables.md").write_text(
        "<!-- generated by `python studies/report.py`; do not edit by hand -->\n# Study tables\n\n" + "".join(parts)
    )
    plots(workloads, scored, args.out)
    print("".join(parts))


def _fmt_rows(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return rows
    out = rows.copy()
    out["predicted"] = [f"{2**v:.3g}" for v in out.pop("pred")]
    out["measured"] = [f"{2**v:.3g}" for v in out.pop("truth")]
    out["error (log2)"] = [f"{e:+.2f} ± {Z95 * s:.2f}" for e, s in zip(out.pop("err"), out.pop("se"), strict=True)]
    out["covered"] = out["covered"].map({True: "yes", False: "no"})
    out.pop("width_x")
    if "loss_gap" in out:
        out["loss vs best"] = [f"{100 * v:+.2f} %" for v in out.pop("loss_gap")]
    return out


if __name__ == "__main__":
    main()
