"""Rendering: rich tables for the terminal. Plots live in plots.py; JSON comes from the results' to_dict."""

from __future__ import annotations

import math

import pandas as pd
from rich.table import Table

from .theory import FULL, lr_label, theory_rows


def theory_table() -> Table:
    t = Table(title="μA: optimal learning rate by regime (α = α0 · r^-γ; n = width, r = rank)")
    for col in ("regime", "init", "α", "peft mapping", "optimal LR", "rank exp.", "width exp."):
        t.add_column(col)
    for row in theory_rows():
        rank_exp = "—" if row["rank_exponent"] is None else f"{row['rank_exponent']:+g}"
        t.add_row(row["regime"], row["init"], row["alpha"], row["peft"], row["optimal_lr"], rank_exp,
                  f"{row['width_exponent']:+g}")
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
        ok = g[g["status"] != "failed"]
        means = ok.groupby("lr")["metric"].mean()
        lrs = sorted(g["lr"].unique())
        finite = means[means.map(math.isfinite)]
        if finite.empty:
            best, loss, where = "—", "—", "[red]all diverged[/]"
        else:
            b = finite.idxmin()
            best, loss = lr_label(b), f"{finite.min():.4f}"
            grid = sorted(means.index)
            where = "[yellow]low edge[/]" if b == grid[0] else "[yellow]high edge[/]" if b == grid[-1] else "interior"
        t.add_row(
            "full-ft" if regime == FULL else regime,
            "—" if regime == FULL else str(rank),
            str(len(g)),
            str(int((g["status"] == "diverged").sum())),
            str(int((g["status"] == "failed").sum())),
            f"{lr_label(lrs[0])}…{lr_label(lrs[-1])}",
            best,
            loss,
            where,
        )
    return t
