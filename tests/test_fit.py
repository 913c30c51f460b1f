"""fit.py on synthetic sweeps: loss(lr) = 2 + c·(log2 lr − log2 η*(r))² + noise, η*(r) = C · r^s."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mua_cli.errors import MuaError
from mua_cli.fit import FitResult, fit_full, fit_regime, fit_run, optimum, pool_log2

LOG2C = -8.3  # off the grid, so the vertex has work to do
RECIPE = {
    "model": "embedded:tiny",
    "alpha0": 1.0,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "warmup_frac": 0.05,
    "min_lr_ratio": 0.1,
    "steps": 100,
    "batch_size": 8,
    "seq_len": 64,
}


def trials(
    spec: dict[str, float],
    ranks=(4, 16, 64, 256),
    seeds=(0,),
    grid=range(-18, 4),
    noise=0.0,
    curv=0.05,
    diverge_gap: float | None = None,
    full_log2: float | None = None,
    rng: int = 0,
    log2c: float = LOG2C,
) -> pd.DataFrame:
    """One row per trial. spec: regime → true exponent s. Rows at log2 lr ≥ x* + diverge_gap diverge."""
    gen = np.random.default_rng(rng)
    groups = [(reg, r, log2c + s * math.log2(r)) for reg, s in spec.items() for r in ranks]
    if full_log2 is not None:
        groups.append(("full", 0, full_log2))
    rows = []
    for reg, r, xs in groups:
        for seed in seeds:
            for x in grid:
                loss = 2.0 + curv * (x - xs) ** 2 + noise * gen.standard_normal()
                div = diverge_gap is not None and x >= xs + diverge_gap
                rows.append(
                    {"regime": reg, "rank": r, "lr": 2.0**x, "seed": seed,
                     "status": "diverged" if div else "ok", "metric": math.inf if div else loss,
                     "steps": 100, "batch_size": 8, "seq_len": 64, "recipe": dict(RECIPE)}
                )  # fmt: skip
    return pd.DataFrame(rows)


def by_rank(fit: FitResult, regime: str) -> dict:
    return {o.rank: o for o in fit.optima_for(regime)}


def test_vertex_is_exact_off_grid_and_interval_has_the_quantisation_floor():
    o = optimum(trials({"A:r": 0.0}, ranks=(16,)))
    assert o.usable and o.edge is None
    assert o.log2_lr_star == pytest.approx(LOG2C, abs=1e-9)
    assert o.best_grid_lr == 2.0**-8
    # one seed, many finite points, noise-free: the LS residual is 0, so the ±0.25 floor is what remains
    assert o.interval_method == "fit"
    assert math.log2(o.lo) == pytest.approx(LOG2C - 0.25) and math.log2(o.hi) == pytest.approx(LOG2C + 0.25)


def test_exponents_recovered_and_consistent_with_mua():
    fit = fit_run(trials({"A:1": -0.5, "A:r": 0.0, "B:r": 1.0}, seeds=(0, 1, 2), noise=0.003))
    for name, s in (("A:1", -0.5), ("A:r", 0.0), ("B:r", 1.0)):
        rf = fit.regimes[name]
        assert rf.ranks_used == [4, 16, 64, 256]
        assert rf.slope == pytest.approx(s, abs=0.05)
        assert rf.verdict == "consistent"
        assert rf.slope_interval[0] < s < rf.slope_interval[1]
        assert rf.dof == 2
    assert all(o.interval_method == "bootstrap" for o in fit.optima)
    # the μA-slope intercept recovers C
    assert fit.regimes["A:1"].intercept_mua == pytest.approx(LOG2C, abs=0.1)


def test_wrong_exponent_is_inconsistent():
    # η* falls as r^-1/2 (A:1's law) but is labelled A:r, whose μA exponent is 0; and the reverse
    fit = fit_run(trials({"A:r": -0.5, "A:1": 0.0, "B:sqrt": 0.5}, seeds=(0, 1, 2), noise=0.003))
    assert fit.regimes["A:r"].verdict == "inconsistent"
    assert fit.regimes["A:1"].verdict == "inconsistent"
    assert fit.regimes["B:sqrt"].verdict == "consistent"


def test_edge_optima_are_detected_and_give_no_eta():
    # grid 2^-10..2^-4: A:1's optimum leaves it at the low end for r ≥ 16; B:r's at the high end for r ≥ 16
    fit = fit_run(trials({"A:1": -0.5, "B:r": 1.0}, ranks=(4, 16, 64), grid=range(-10, -3)))
    a = by_rank(fit, "A:1")
    assert a[4].usable and a[4].edge is None
    for r in (16, 64):
        assert a[r].edge == "low" and not a[r].usable
        assert a[r].lr_star is None and a[r].lo is None
        assert a[r].best_grid_lr == 2.0**-10 and "edge" in a[r].reason
    b = by_rank(fit, "B:r")
    assert b[4].usable and [b[r].edge for r in (16, 64)] == ["high", "high"]
    assert fit.regimes["A:1"].ranks_used == [4]
    assert fit.regimes["A:1"].slope is None
    assert [u["edge"] for u in fit.regimes["B:r"].unusable] == ["high", "high"]


def test_diverged_rows_bound_from_above_without_breaking_the_fit():
    fit = fit_run(trials({"A:1": -0.5}, seeds=(0, 1, 2), noise=0.003, diverge_gap=1.5))
    rf = fit.regimes["A:1"]
    assert fit.n_diverged > 0
    # the grid runs to 2^0 but everything above the optimum diverged: no "high edge"
    assert all(o.edge is None and o.n_diverged > 0 for o in fit.optima)
    assert rf.slope == pytest.approx(-0.5, abs=0.05) and rf.verdict == "consistent"


def test_diverged_neighbour_falls_back_to_the_grid_bracket():
    o = optimum(trials({"A:r": 0.0}, ranks=(16,), seeds=(0, 1), diverge_gap=0.8))
    assert o.usable and o.interval_method == "grid" and o.note
    assert o.lr_star == 2.0**-8 and o.lo == 2.0**-9 and o.hi == 2.0**-7


def test_diverged_only_at_edge_lr_is_not_an_optimum():
    # every LR above the lowest diverged: the optimum is below the grid
    o = optimum(trials({"A:r": 0.0}, ranks=(16,), grid=range(-8, -3), diverge_gap=0.0, log2c=-12))
    assert not o.usable and o.edge == "low" and "diverged" in o.reason


def test_interval_method_chosen_by_the_data():
    def method(**kw):
        return optimum(trials({"A:r": 0.0}, ranks=(16,), **kw)).interval_method

    assert method(seeds=(0, 1, 2)) == "bootstrap"
    assert method(seeds=(0, 1)) == "bootstrap"
    assert method(grid=range(-10, -6)) == "fit"  # 4 finite points within best ± 2
    assert method(grid=range(-9, -6)) == "grid"  # 3 points only


def test_intervals_cover_the_truth_under_noise():
    for seeds in ((0,), (0, 1, 2)):
        for rng in range(3):
            for o in fit_run(trials({"A:1": -0.5}, seeds=seeds, noise=0.01, rng=rng)).optima:
                truth = LOG2C - 0.5 * math.log2(o.rank)
                assert math.log2(o.lo) <= truth <= math.log2(o.hi), (seeds, o)
                assert math.log2(o.lo) <= o.log2_lr_star <= math.log2(o.hi)
                assert math.log2(o.hi / o.lo) >= 0.5 - 1e-9  # the quantisation floor


def test_intervals_widen_with_noise():
    def mean_width(noise, seeds):
        optima = fit_run(trials({"A:1": -0.5}, seeds=seeds, noise=noise, rng=1)).optima
        return np.mean([math.log2(o.hi / o.lo) for o in optima])

    for seeds in ((0,), (0, 1, 2)):
        assert mean_width(0.0, seeds) == pytest.approx(0.5)
        assert mean_width(0.05, seeds) > 0.6


def test_failed_rows_are_absent():
    base = trials({"A:r": 0.0}, ranks=(4, 16), seeds=(0, 1), noise=0.002)
    extra = base.iloc[:4].copy()
    extra["lr"] = [2.0**-30, 2.0**5, 2.0**-8, 2.0**-8]  # beyond the grid both ways, and at the best LR
    extra["status"] = "failed"
    extra["metric"] = [math.nan, math.nan, 0.0, math.nan]
    a, b = fit_run(base), fit_run(pd.concat([base, extra], ignore_index=True))
    assert b.n_failed == 4
    assert [o.to_dict() for o in a.optima] == [o.to_dict() for o in b.optima]


def test_two_ranks_give_a_slope_without_interval():
    rf = fit_run(trials({"A:1": -0.5}, ranks=(4, 64))).regimes["A:1"]
    assert rf.slope == pytest.approx(-0.5, abs=1e-6)
    assert rf.slope_interval is None and rf.verdict == "untested" and "no interval" in rf.note
    assert rf.intercept_mua_interval is not None and rf.dof_mua == 1


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


def test_fit_json_round_trip():
    df = trials({"A:1": -0.5, "B:1": 0.0}, ranks=(4, 16, 64), seeds=(0, 1), grid=range(-11, -5), full_log2=-9)
    fit = fit_run(df)
    assert any(not o.usable for o in fit.optima)  # Nones must survive too
    d = fit.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = FitResult.from_dict(json.loads(text))
    assert back.to_dict() == d
    assert back.regimes["A:1"].slope == fit.regimes["A:1"].slope
    assert d["settings"]["steps"] == 100 and "AdamW" in d["settings"]["optimizer"]
    assert "cosine" in d["settings"]["schedule"] and d["settings"]["alpha0"] == 1.0
    with pytest.raises(MuaError):
        FitResult.from_dict({"settings": {}})


def test_full_vs_b1_ratio():
    fit = fit_run(trials({"B:1": 0.0}, seeds=(0, 1), noise=0.002, full_log2=LOG2C - 1.5))
    assert fit.full.regime == "full" and fit.full.usable
    assert fit.full.log2_lr_star == pytest.approx(LOG2C - 1.5, abs=0.05)
    c = fit.full_vs_b1
    assert c.ratio == pytest.approx(2**1.5, rel=0.1)
    assert c.ratio_interval[0] < 2**1.5 < c.ratio_interval[1]
    assert not c.consistent_with_one
    same = fit_run(trials({"B:1": 0.0}, seeds=(0, 1), noise=0.002, full_log2=LOG2C)).full_vs_b1
    assert same.consistent_with_one and same.ratio == pytest.approx(1.0, rel=0.1)
    assert fit_run(trials({"A:r": 0.0}, full_log2=LOG2C)).full_vs_b1 is None


def test_fit_full_and_fit_regime_directly():
    df = trials({"A:r": 0.0}, full_log2=-10.0, ranks=(4,))
    o = fit_full(df[df["regime"] == "full"])
    assert o.regime == "full" and o.rank == 0 and o.log2_lr_star == pytest.approx(-10.0, abs=1e-9)
    optima = [optimum(g) for _, g in trials({"A:1": -0.5}).groupby("rank")]
    assert fit_regime(optima, "A:1").slope == pytest.approx(-0.5, abs=1e-9)
    assert fit_regime(optima, "A:r").ranks == []  # other regimes' optima are not mixed in


def test_pool_log2():
    one = pool_log2([-8.0], [0.2])
    assert one.mean == -8.0 and one.half == pytest.approx(1.96 * 0.2, rel=1e-3) and one.dof is None
    ys, ses = [-8.0, -8.5, -7.9], [0.1, 0.2, 0.1]
    p = pool_log2(ys, ses)
    var = np.var(ys, ddof=1) / 3 + sum(s**2 for s in ses) / 9
    assert p.mean == pytest.approx(np.mean(ys)) and p.se == pytest.approx(math.sqrt(var))
    assert p.half == pytest.approx(4.302653 * math.sqrt(var), rel=1e-5) and p.dof == 2


def test_noise_free_fit_keeps_the_per_rank_widths():
    # exact optima fit a line perfectly; the slope's SE still carries the ±0.25 log2 per-rank floor
    rf = fit_run(trials({"A:1": -0.5})).regimes["A:1"]
    assert rf.resid_se == pytest.approx(0.0, abs=1e-9)
    assert rf.slope_se == pytest.approx(0.25 / 1.959964 * math.sqrt(0.05), rel=1e-3)
    assert rf.verdict == "consistent"
