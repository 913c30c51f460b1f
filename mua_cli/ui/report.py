"""Rendering: rich tables for the terminal. Plots live in plots.py; JSON comes from the results' to_dict."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..science import calibration as cal
from ..science.optimum import seed_adjusted
from ..science.theory import FULL, lr_label, theory_rows
from ..science.transfer import curvature_text, used_slope_interval

if TYPE_CHECKING:  # a table of trials gets its frame from the caller: `mua transfer` loads no pandas
    import pandas as pd


def theory_table() -> Table:
    t = Table(title="μA: optimal learning rate by regime (α = α0 · r^-γ; n = width, r = rank)")
    for col in ("regime", "init", "α", "peft mapping", "optimal LR", "rank exp.", "width exp."):
        t.add_column(col)
    for row in theory_rows():
        rank_exp = "—" if row["rank_exponent"] is None else f"{row['rank_exponent']:+g}"
        t.add_row(
            row["regime"],
            row["init"],
            row["alpha"],
            row["peft"],
            row["optimal_lr"],
            rank_exp,
            f"{row['width_exponent']:+g}",
        )
    t.caption = "B:1 (Init[B], lora_alpha = r) shares full finetuning's width scaling: its LR transfers to full FT."
    return t


def recipes_table(rows) -> Table:
    t = Table(title="recipes")
    t.add_column("name")
    t.add_column("description")
    t.add_column("file")
    for name, path, desc in rows:
        t.add_row(name, desc, str(path))
    return t


def sweep_table(df: pd.DataFrame) -> Table:
    """Per (regime, rank): trials, the best grid LR and its loss, divergences, and whether it is interior."""
    t = Table(title="sweep results (best grid point per regime and rank)")
    for col in ("regime", "rank", "trials", "diverged", "failed", "LR range", "best LR", "best loss", "optimum"):
        t.add_column(col, justify="right" if col not in ("regime", "optimum") else "left")
    for (regime, rank), g in df.groupby(["regime", "rank"], sort=True):
        ok = g[g["status"] != "failed"].copy()
        fin = ok["metric"].map(math.isfinite)
        if fin.any():  # seeds shift whole curves: put them on one level before averaging (as fit does)
            ok.loc[fin, "metric"] = seed_adjusted(
                np.log2(ok.loc[fin, "lr"].to_numpy(float)), ok.loc[fin, "metric"].to_numpy(float),
                ok.loc[fin, "seed"].to_numpy(),
            )  # fmt: skip
        means = ok.groupby("lr")["metric"].mean()
        lrs = sorted(g["lr"].unique())
        finite = means[means.map(math.isfinite)]
        n_div, n_fail = int((g["status"] == "diverged").sum()), int((g["status"] == "failed").sum())
        if finite.empty:
            # diverged trials are results (the LR is too high); failed ones are errors (nothing was learned)
            what = "all diverged" if not n_fail else "all failed" if not n_div else "no finite loss"
            best, loss, where = "—", "—", f"[red]{what}[/]"
        else:
            b = finite.idxmin()
            best, loss = lr_label(b), f"{finite.min():.4f}"
            grid = sorted(means.index)
            where = "[yellow]low edge[/]" if b == grid[0] else "[yellow]high edge[/]" if b == grid[-1] else "interior"
        t.add_row(
            "full-ft" if regime == FULL else regime,
            "—" if regime == FULL else str(rank),
            str(len(g)),
            str(n_div),
            str(n_fail),
            f"{lr_label(lrs[0])}…{lr_label(lrs[-1])}",
            best,
            loss,
            where,
        )
    return t


def _lr(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def _interval(lo: float | None, hi: float | None) -> str:
    return "—" if lo is None or hi is None else f"[{lo:.3g}, {hi:.3g}]"


def fit_tables(fit) -> list:
    """The η* per (regime, rank) table, the exponent table, and the full-finetuning comparison."""
    t = Table(title="η* per regime and rank (95 % interval)")
    for col in ("regime", "rank", "η*", "interval", "method", "best grid LR", "seeds", "trials", "note"):
        t.add_column(col)
    rows = list(fit.optima) + ([fit.full] if fit.full else [])
    for o in rows:
        note = o.reason or o.note or ""
        # diverged trials are results (they bound η* from above); failed ones are errors, left out
        counts = [f"{o.n_diverged} diverged"] * bool(o.n_diverged) + [f"[red]{o.n_failed} failed[/]"] * bool(o.n_failed)
        trials = f"{o.n_trials}" + (f" ({', '.join(counts)})" if counts else "")
        if o.edge:
            note = f"[yellow]optimum at the {o.edge} edge: no η*[/]"
        t.add_row(
            "full-ft" if o.regime == FULL else o.regime,
            "—" if o.regime == FULL else str(o.rank),
            _lr(o.lr_star),
            _interval(o.lo, o.hi),
            o.interval_method or "—",
            "—" if o.best_grid_lr is None else lr_label(o.best_grid_lr),
            str(o.n_seeds),
            trials,
            note,
        )
    s = Table(title="η* ∝ r^slope per regime: measured, μA's, and the slope used for predictions (95 % intervals)")
    cols = ("regime", "ranks used", "measured slope", "95 % interval", "μA", "study curvature", "slope after curvature",
            "used slope", "used slope 95 %", "weight on data")  # fmt: skip
    for col in cols:
        s.add_column(col)
    for name, rf in sorted(fit.regimes.items()):
        verdict = {"consistent": "", "inconsistent": " [red](excludes μA)[/]"}.get(rf.verdict, "")
        used = rf.shrunk_slope is not None and rf.slope is not None
        s.add_row(
            name,
            ",".join(map(str, rf.ranks_used)) or "—",
            "—" if rf.slope is None else f"{rf.slope:+.3f}",
            "—" if not rf.slope_interval else f"[{rf.slope_interval[0]:+.3f}, {rf.slope_interval[1]:+.3f}]{verdict}",
            f"{rf.expected_slope:+g}",
            curvature_text(rf) if rf.curvature else "—",
            "—" if rf.line_slope is None else f"{rf.line_slope:+.3f}",
            "—" if rf.shrunk_slope is None else f"{rf.shrunk_slope:+.3f}",
            "[{:+.3f}, {:+.3f}]".format(*used_slope_interval(rf)) if used else "—",
            "—" if rf.data_weight is None else f"{rf.data_weight:.0%}",
        )
    noise = "" if fit.noise_sd is None else f"; loss noise σ = {fit.noise_sd:.3g} ({fit.noise_dof} dof, pooled)"
    s.caption = (
        f"used slope: the slope after the study's curvature, shrunk toward μA's with the study's prior SD "
        f"{cal.SLOPE_PRIOR_SD:g}" + noise
    )
    out = [t, s]
    notes = [f"[yellow]note[/] ({name}): {escape(rf.note)}" for name, rf in sorted(fit.regimes.items()) if rf.note]
    if notes:
        out.append(Text.from_markup("\n".join(notes)))
    full = full_table(fit)
    if full is not None:
        out.append(full)
    return out


def full_table(fit) -> Table | None:
    """Full finetuning: B:1's η* as the study's rule reads it, the study's B:1 / full ratio, the prediction, and
    beside them what the run measured. Every number `mua transfer --to full-ft` quotes is here, under one name."""
    from ..errors import MuaError
    from ..science.anchor import full_anchor
    from ..science.fit import fit_regime
    from ..science.full_ft import predict_full, study_ratio

    b1 = fit.regimes.get("B:1")
    if b1 is None or not b1.ranks_used:
        return None
    try:
        pred = predict_full(fit, basis="predict")
    except MuaError:
        return None
    anchor = full_anchor(b1, fit.optima, fit_regime)
    ref, label = anchor.log2, anchor.label
    sr = study_ratio(fit, b1)
    lo, hi = sr.interval
    f = Table(title="full finetuning: B:1's η* ÷ the study's B:1 / full ratio (μA's raw rule: ratio 1)")
    cols = [label, "study's B:1 / full", "predicted full-ft η*", "measured full-ft η*", "measured B:1 / full",
            "predicted / measured"] + ["study's ratio read at"] * bool(sr.basis)  # fmt: skip
    for col in cols:
        f.add_column(col)
    c = fit.full_vs_b1
    f.add_row(
        _lr(2.0**ref),
        f"{sr.ratio:.3g} {_interval(lo, hi)}",
        f"{_lr(pred.lr)} {_interval(pred.lo, pred.hi)}",
        "—" if c is None else f"{_lr(c.full_lr)} {_interval(*c.full_interval)}",
        "—" if c is None else f"{c.ratio:.3g} {_interval(*c.ratio_interval)}",
        "—" if c is None else f"{pred.lr / c.full_lr:.2f}",
        *([sr.basis] if sr.basis else []),
    )
    model = f" (its model's value at {sr.basis})" if sr.basis else ""
    f.caption = (
        f"study's ratio{model}: {cal.B1_OVER_FULL_N} workloads of {cal.B1_OVER_FULL_FAMILIES} model families, "
        f"95 % interval for a new workload (docs/validation.md); intervals are 95 %"
    )
    return f


def prediction_panel(pred):
    """A person's view of one prediction: the number, its interval, its basis, and what it holds for."""
    from rich.panel import Panel

    target = "full finetuning" if pred.target == "full-ft" else f"LoRA rank {pred.target} ({pred.regime})"
    lines = [
        f"[bold]learning rate for {target}: [green]{_lr(pred.lr)}[/][/]   95 % interval {_interval(pred.lo, pred.hi)}",
        f"basis: {pred.basis} — {pred.reason}",
        f"from ranks: {', '.join(map(str, pred.ranks_used))}",
    ]
    if pred.basis == "heuristic":
        lines.append("[yellow]HEURISTIC, not μA: 'LoRA Without Regret' (Schulman et al., 2025)[/]")
    ev = pred.evidence or {}
    if pred.basis == "measured" and ev.get("predicted") is not None:
        lines.append(
            f"[bold]evidence:[/] the prediction without these trials ({ev['predicted_basis']}) was "
            f"{ev['predicted']:.3g}, {ev['ratio_predicted_to_measured']:.2f}× the measured optimum"
            + (f"; measured B:1 / full {ev['b1_over_full']:.3g}" if ev.get("b1_over_full") else "")
        )
    elif pred.basis == "measured" and ev.get("predicted_without_this_rank"):
        p = ev["predicted_without_this_rank"]
        lines.append(
            f"[bold]evidence:[/] the other ranks' line predicted {p['lr']:.3g} here; measured / predicted = "
            f"{p['ratio_measured_to_predicted']:.2f}"
        )
    lines.append("")
    lines.append("[bold]holds for[/] (" + pred.caveat + "):")
    for k, v in pred.settings.items():
        lines.append(f"  {k}: {', '.join(map(str, v)) if isinstance(v, list | tuple) else v}")
    if pred.peft:
        lines.append(f"[bold]peft:[/] {pred.peft}")
    for n in pred.notes:
        lines.append(f"[yellow]note:[/] {n}")
    return Panel("\n".join(lines), title="mua transfer", expand=False)
