"""fit.py on synthetic sweeps with known non-zero slopes, asymmetric loss curves, seed shifts and noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from synthetic import LOG2C, RECIPE, trials

from mua_cli.errors import MuaError
from mua_cli.science import calibration as cal
from mua_cli.science.fit import FitResult, fit_regime, fit_run
from mua_cli.science.rank_optima import fit_full, optimum


@pytest.fixture(autouse=True)
def power_law_truth(monkeypatch):
    """The synthetic optima follow a pure power law in rank: no study curvature unless a test sets one."""
    monkeypatch.setattr(cal, "RANK_CURVATURE", {})


HALF = np.arange(-40, 8) / 2  # a half-octave grid, as a refined sweep has near its optimum


def by_rank(fit: FitResult, regime: str) -> dict:
    return {o.rank: o for o in fit.optima_for(regime)}


def truths(df: pd.DataFrame) -> pd.Series:
    return df.groupby(["regime", "rank"])["x_true"].first()


def test_vertex_is_exact_off_grid_even_with_asymmetric_curvature():
    for asym in (1.0, 3.0):
        o = optimum(trials({"A:r": 0.0}, ranks=(16,), asym=asym))
        assert o.usable and o.edge is None and o.interval_method == "profile"
        assert o.log2_lr_star == pytest.approx(LOG2C, abs=0.03)  # ρ is profiled on a grid
        assert o.best_grid_lr == 2.0**-8
        assert o.n_points == 5  # every LR within two octaves of the best, not three points


def test_a_symmetric_parabola_would_be_biased_where_this_fit_is_not():
    # loss rises 4x faster above the optimum: the three-point parabola of the old fit lands 0.25 octave off
    df = trials({"A:r": 0.0}, ranks=(16,), asym=4.0, log2c=-8.4)
    o = optimum(df)
    assert o.log2_lr_star == pytest.approx(-8.4, abs=0.03)


def test_slopes_recovered_with_intervals_that_cover():
    df = trials({"A:1": -0.5, "A:r": 0.0, "B:1": -0.3}, seeds=(0, 1), noise=0.01, asym=2.0, rng=3)
    fit = fit_run(df)
    for name, s in (("A:1", -0.5), ("A:r", 0.0), ("B:1", -0.3)):
        rf = fit.regimes[name]
        assert rf.ranks_used == [4, 16, 64, 256]
        assert rf.slope == pytest.approx(s, abs=0.06)
        assert rf.slope_interval[0] < s < rf.slope_interval[1]
        assert rf.slope_interval[1] - rf.slope_interval[0] < 0.4  # narrow enough to act on
    assert fit.regimes["B:1"].verdict == "inconsistent"  # −0.3 is not μA's 0, and the data say so
    assert fit.noise_sd == pytest.approx(0.01, rel=0.5) and fit.noise_dof > 20


def test_shrinkage_weighs_data_against_mua_by_precision():
    precise = fit_run(trials({"B:1": -0.4}, seeds=(0, 1), noise=0.005, grid=HALF)).regimes["B:1"]
    assert precise.data_weight > 0.9 and precise.shrunk_slope == pytest.approx(-0.4, abs=0.06)
    # two close ranks and a noisy sweep: the slope is poorly measured, so μA's 0 carries more weight
    noisy = fit_run(trials({"B:1": -0.4}, ranks=(8, 16), noise=0.04, rng=2)).regimes["B:1"]
    assert noisy.data_weight < precise.data_weight
    lo, hi = sorted((noisy.slope, noisy.expected_slope))
    assert lo <= noisy.shrunk_slope <= hi
    assert noisy.shrunk_slope_se < noisy.slope_se and noisy.shrunk_slope_se < noisy.prior_sd


def test_slope_interval_covers_the_truth_in_40_repeats():
    """Known non-zero slope, asymmetric curves, seed shifts, noise, and per-rank scatter about the power law."""
    hits, widths = 0, []
    for rng in range(40):
        df = trials({"B:1": -0.3}, noise=0.01, asym=2.5, seed_shift=0.01, jitter=0.1, rng=rng)
        rf = fit_run(df).regimes["B:1"]
        hits += rf.slope_interval[0] <= -0.3 <= rf.slope_interval[1]
        widths.append(rf.slope_interval[1] - rf.slope_interval[0])
    assert hits >= 36, hits  # ≥ 90 %
    assert np.median(widths) < 0.5


def test_per_rank_intervals_cover_with_one_seed_and_with_two():
    for seeds in ((0,), (0, 1)):
        hits = n = 0
        for rng in range(15):
            df = trials({"A:1": -0.5, "B:1": -0.2}, seeds=seeds, noise=0.015, asym=2.0, rng=rng)
            t = truths(df)
            for o in fit_run(df).optima:
                n += 1
                hits += math.log2(o.lo) <= t[(o.regime, o.rank)] <= math.log2(o.hi)
                assert math.log2(o.lo) <= o.log2_lr_star <= math.log2(o.hi)
        assert hits / n >= 0.88, (seeds, hits, n)


def test_intervals_narrow_with_seeds_and_refinement():
    def width(**kw):
        optima = fit_run(trials({"A:1": -0.5}, **{"noise": 0.02, "asym": 2.0, "rng": 5, **kw})).optima
        return np.median([math.log2(o.hi / o.lo) for o in optima])

    one = width()
    assert width(seeds=(0, 1, 2)) < one
    assert width(grid=HALF) < one
    assert width(noise=0.05) > one  # and widen with noise


def test_edge_optima_are_detected_and_give_no_eta():
    # grid 2^-10..2^-4: A:1's optimum leaves it at the low end for r ≥ 16; B:r's at the high end for r ≥ 16
    fit = fit_run(trials({"A:1": -0.5, "B:r": 1.0}, ranks=(4, 16, 64), grid=range(-10, -3)))
    a = by_rank(fit, "A:1")
    assert a[4].usable and a[4].edge is None
    for r in (16, 64):
        assert a[r].edge == "low" and not a[r].usable and a[r].lo is None
        assert a[r].best_grid_lr == 2.0**-10 and "edge" in a[r].reason
    b = by_rank(fit, "B:r")
    assert b[4].usable and [b[r].edge for r in (16, 64)] == ["high", "high"]
    rf = fit.regimes["A:1"]
    assert rf.ranks_used == [4] and rf.slope is None
    # one rank: μA's exponent with the study's spread, stated as such
    assert rf.shrunk_slope == -0.5 and rf.shrunk_slope_se == cal.SLOPE_PRIOR_SD and "one usable rank" in rf.note
    assert [u["edge"] for u in fit.regimes["B:r"].unusable] == ["high", "high"]


def test_diverged_neighbour_is_censored():
    # LRs above x* + gap diverge, so the high side has one finite point or none
    for gap in (0.6, 1.2):
        hits = 0
        for rng in range(10):
            df = trials({"A:r": 0.0}, ranks=(16,), seeds=(0, 1), noise=0.01, asym=2.0, diverge_gap=gap, rng=rng)
            o = optimum(df)
            assert o.usable and o.n_diverged > 0
            hits += math.log2(o.lo) <= LOG2C <= math.log2(o.hi)
            first_diverged = min(p["lr"] for p in o.points if p["n_diverged"])
            assert o.hi < first_diverged  # the censored point bounds η* from above
        assert hits >= 8, (gap, hits)


def test_diverged_only_at_edge_lr_is_not_an_optimum():
    o = optimum(trials({"A:r": 0.0}, ranks=(16,), grid=range(-8, -3), diverge_gap=0.0, log2c=-12))
    assert not o.usable and o.edge == "low" and "diverged" in o.reason


def test_without_noise_information_the_interval_is_the_grid_bracket():
    # three LRs only: no residual degrees of freedom anywhere in the run
    o = optimum(trials({"A:r": 0.0}, ranks=(16,), grid=range(-9, -6)))
    assert o.interval_method == "grid" and "no noise estimate" in o.note
    assert o.lo == 2.0**-9 and o.hi == 2.0**-7


def test_failed_rows_are_absent():
    base = trials({"A:r": 0.0}, ranks=(4, 16), seeds=(0, 1), noise=0.002)
    extra = base.iloc[:4].copy()
    extra["lr"] = [2.0**-30, 2.0**5, 2.0**-8, 2.0**-8]  # beyond the grid both ways, and at the best LR
    extra["status"] = "failed"
    extra["metric"] = [math.nan, math.nan, 0.0, math.nan]
    a, b = fit_run(base), fit_run(pd.concat([base, extra], ignore_index=True))
    assert b.n_failed == 4
    counted = ("n_failed", "n_trials")  # the failed rows are counted, and change nothing else
    assert [{k: v for k, v in o.to_dict().items() if k not in counted} for o in a.optima] == [
        {k: v for k, v in o.to_dict().items() if k not in counted} for o in b.optima
    ]
    assert sum(o.n_failed for o in b.optima) == 4 and sum(o.n_failed for o in a.optima) == 0
    assert sum(o.n_trials for o in b.optima) == sum(o.n_trials for o in a.optima) + 4


def test_mixed_run_is_refused():
    df = trials({"A:r": 0.0}, ranks=(4, 16))
    mixed = df.copy()
    mixed.loc[mixed["rank"] == 16, "steps"] = 200
    with pytest.raises(MuaError, match="steps"):
        fit_run(mixed)
    mixed = df.copy()
    mixed["recipe"] = [dict(RECIPE, warmup_frac=0.1 if r == 16 else 0.05) for r in mixed["rank"]]
    with pytest.raises(MuaError, match="warmup_frac"):
        fit_run(mixed)
    fit_run(df)  # the unmixed table fits


def test_unusable_tables_are_refused():
    df = trials({"A:r": 0.0}, ranks=(4,), grid=range(-10, -6))
    with pytest.raises(MuaError, match="empty"):
        fit_run(df.iloc[:0])
    with pytest.raises(MuaError, match="failed"):
        fit_run(df.assign(status="failed", metric=math.nan))
    with pytest.raises(MuaError, match="diverged"):
        fit_run(df.assign(status="diverged", metric=math.inf))
    with pytest.raises(MuaError, match="unknown regime"):
        fit_run(df.assign(regime="C:r"))


def test_fit_json_round_trip_and_old_schema_refused():
    df = trials({"A:1": -0.5, "B:1": 0.0}, ranks=(4, 16, 64), seeds=(0, 1), grid=range(-11, -5), full_log2=-9)
    fit = fit_run(df)
    assert any(not o.usable for o in fit.optima)  # Nones must survive too
    d = fit.to_dict()
    back = FitResult.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back.to_dict() == d
    assert back.regimes["A:1"].line(6.0) == fit.regimes["A:1"].line(6.0)
    assert d["settings"]["steps"] == 100 and "AdamW" in d["settings"]["optimizer"]
    with pytest.raises(MuaError):
        FitResult.from_dict({"settings": {}})
    with pytest.raises(MuaError, match="schema"):
        FitResult.from_dict({**d, "schema": 1})


def test_full_vs_b1_is_measured_at_the_reference_rank():
    # B:1 falls with rank; full finetuning sits 1.5 octaves below B:1 at the reference rank
    rank = {"cell16": cal.FULL_REF_RANK, "cell-max": cal.FULL_SOURCE_MAX_RANK}.get(cal.FULL_ANCHOR, cal.FULL_REF_RANK)
    ref = LOG2C - 0.3 * math.log2(rank)  # B:1 where the study's rule reads it
    fit = fit_run(trials({"B:1": -0.3}, seeds=(0, 1), noise=0.005, full_log2=ref - 1.5))
    assert fit.full.regime == "full" and fit.full.usable
    assert math.log2(fit.full.lo) - 1e-6 <= ref - 1.5 <= math.log2(fit.full.hi) + 1e-6
    assert fit.full.log2_lr_star == pytest.approx(ref - 1.5, abs=0.15)
    c = fit.full_vs_b1
    assert c.ref_rank == cal.FULL_REF_RANK
    assert math.log2(c.ratio) == pytest.approx(1.5, abs=0.2) and c.anchor == cal.FULL_ANCHOR
    assert c.ratio_interval[0] < 2**1.5 < c.ratio_interval[1] and not c.consistent_with_one
    assert fit_run(trials({"A:r": 0.0}, full_log2=LOG2C)).full_vs_b1 is None


def test_fit_full_and_fit_regime_directly():
    df = trials({"A:r": 0.0}, full_log2=-10.0, ranks=(4,))
    o = fit_full(df[df["regime"] == "full"])
    assert o.regime == "full" and o.rank == 0 and o.log2_lr_star == pytest.approx(-10.0, abs=0.02)
    optima = fit_run(trials({"A:1": -0.5})).optima
    assert fit_regime(optima, "A:1").slope == pytest.approx(-0.5, abs=0.02)
    assert fit_regime(optima, "A:r").ranks == []  # other regimes' optima are not mixed in


def test_line_widens_with_the_distance_of_the_extrapolation():
    rf = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), noise=0.01, rng=1)).regimes["B:1"]
    ses = [rf.line(math.log2(r))[1] for r in (16, 256, 4096)]
    assert ses[0] < ses[1] < ses[2]
    assert rf.line(rf.centre_x, "mua")[1] == pytest.approx(math.sqrt(rf.centre_se**2 + rf.tau**2))


def test_fit_table_counts_failed_and_diverged_apart():
    from rich.console import Console

    from mua_cli.ui.report import fit_tables

    base = trials({"A:r": 0.0}, ranks=(4, 16), seeds=(0,), noise=0.002)
    extra = base.iloc[:2].copy()
    extra["status"], extra["metric"] = ["failed", "diverged"], [math.nan, math.inf]
    extra["lr"] = [2.0**-8, 2.0**3]
    console = Console(record=True, width=200)
    for table in fit_tables(fit_run(pd.concat([base, extra], ignore_index=True))):
        console.print(table)
    text = console.export_text()
    assert "1 diverged, 1 failed" in text
