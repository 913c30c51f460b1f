"""plots.py: the fit's PNG, including regimes without any η* (no legend, no matplotlib warnings)."""

from __future__ import annotations

import math
import warnings

import pandas as pd

from mua_cli.science.fit import fit_run
from mua_cli.ui.plots import plot_fit

RECIPE = {"model": "embedded:tiny", "alpha0": 1.0, "steps": 100}


def _rows(regime: str, optimum_log2: float, ranks=(4, 16, 64), grid=range(-12, -3)) -> list[dict]:
    return [
        {"regime": regime, "rank": r, "lr": 2.0**x, "seed": 0, "status": "ok",
         "metric": 2.0 + 0.05 * (x - optimum_log2) ** 2, "steps": 100, "batch_size": 8, "seq_len": 64,
         "recipe": RECIPE}
        for r in ranks for x in grid
    ]  # fmt: skip


def _diverged(regime: str, ranks=(4, 16)) -> list[dict]:
    return [
        {"regime": regime, "rank": r, "lr": 2.0**x, "seed": 0, "status": "diverged", "metric": math.inf,
         "steps": 100, "batch_size": 8, "seq_len": 64, "recipe": RECIPE}
        for r in ranks for x in range(-12, -3)
    ]  # fmt: skip


def test_regimes_without_an_optimum_plot_without_warnings(tmp_path):
    # A:r interior; B:1 at the grid's low edge (no η*); A:1 every trial diverged (no points at all)
    df = pd.DataFrame(_rows("A:r", -8.0) + _rows("B:1", -20.0) + _diverged("A:1"))
    fit = fit_run(df)
    assert fit.regimes["A:r"].ranks_used and not fit.regimes["B:1"].ranks_used
    assert not fit.regimes["A:1"].ranks_used
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" would fail here
        path = plot_fit(fit, tmp_path / "fit.png")
    assert path.stat().st_size > 10_000
