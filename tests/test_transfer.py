"""transfer.py: predictions at a target rank and for full finetuning, from fits of synthetic sweeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mua_cli.errors import MuaError
from mua_cli.fit import FitResult, fit_run
from mua_cli.transfer import CAVEAT, predict_full, predict_rank

LOG2C = -8.3
RECIPE = {"model": "embedded:tiny", "alpha0": 1.0, "betas": [0.9, 0.999], "warmup_frac": 0.05, "steps": 100}
KEYS = {
    "lr",
    "interval",
    "target",
    "regime",
    "basis",
    "reason",
    "ranks_used",
    "settings",
    "caveat",
    "evidence",
}


def trials(spec, ranks=(4, 16, 64, 256), seeds=(0,), grid=range(-20, 4), noise=0.0, full_log2=None, rng=0):
    """loss = 2 + 0.05·(log2 lr − x*)² + noise, x* = LOG2C + s·log2 r; spec: regime → s."""
    gen = np.random.default_rng(rng)
    groups = [(reg, r, LOG2C + s * math.log2(r)) for reg, s in spec.items() for r in ranks]
    if full_log2 is not None:
        groups.append(("full", 0, full_log2))
    rows = [
        {"regime": reg, "rank": r, "lr": 2.0**x, "seed": seed, "status": "ok",
         "metric": 2.0 + 0.05 * (x - xs) ** 2 + noise * gen.standard_normal(),
         "steps": 100, "batch_size": 8, "seq_len": 64, "recipe": RECIPE}
        for reg, r, xs in groups for seed in seeds for x in grid
    ]  # fmt: skip
    return pd.DataFrame(rows)


def half_width(p) -> float:
    return math.log2(p.hi / p.lo) / 2


def test_rank_invariant_regime_predicts_the_common_optimum():
    fit = fit_run(trials({"A:r": 0.0, "B:1": 0.0}))
    for reg in ("A:r", "B:1"):
        p = predict_rank(fit, reg, 1024)
        assert math.log2(p.lr) == pytest.approx(LOG2C, abs=1e-6)
        assert p.basis == "muA-slope" and "consistent with μA" in p.reason
        assert p.lo < p.lr < p.hi and p.target == 1024 and p.ranks_used == [4, 16, 64, 256]


def test_known_exponent_extrapolates_within_its_interval():
    fit = fit_run(trials({"A:1": -0.5, "A:sqrt": -0.25}, seeds=(0, 1, 2), noise=0.005, rng=4))
    for reg, s in (("A:1", -0.5), ("A:sqrt", -0.25)):
        for rank in (1024, 32):
            p = predict_rank(fit, reg, rank)
            truth = LOG2C + s * math.log2(rank)
            assert math.log2(p.lr) == pytest.approx(truth, abs=0.15)
            assert math.log2(p.lo) < truth < math.log2(p.hi)
            assert p.basis == "muA-slope"
    assert any("extrapolates" in n for n in predict_rank(fit, "A:1", 1024).notes)
    assert not predict_rank(fit, "A:1", 32).notes


def test_inconsistent_slope_uses_the_free_slope_and_widens_with_distance():
    # η* ∝ r^-1/2 labelled A:r (μA: 0): μA's slope would mispredict rank 4096 by 2^-3.5 ≈ 0.09×
    fit = fit_run(trials({"A:r": -0.5}, seeds=(0, 1, 2), noise=0.005, rng=2))
    assert fit.regimes["A:r"].verdict == "inconsistent"
    p = predict_rank(fit, "A:r", 4096)
    assert p.basis == "free-slope" and "excludes μA's" in p.reason
    truth = LOG2C - 0.5 * 12
    assert math.log2(p.lr) == pytest.approx(truth, abs=0.3)
    assert math.log2(p.lo) < truth < math.log2(p.hi)
    assert half_width(predict_rank(fit, "A:r", 32)) < half_width(predict_rank(fit, "A:r", 1024)) < half_width(p)


def test_two_ranks_use_mua_untested():
    fit = fit_run(trials({"A:1": -0.5}, ranks=(4, 64)))
    p = predict_rank(fit, "A:1", 256)
    assert p.basis == "muA-slope" and "untested" in p.reason
    assert math.log2(p.lr) == pytest.approx(LOG2C - 4, abs=1e-6)


def test_rank_errors():
    fit = fit_run(trials({"A:1": -0.5}, ranks=(4, 16, 64), grid=range(-10, -3)))  # r ≥ 16 at the low edge
    with pytest.raises(MuaError, match=r"1 usable rank.*16 \(low edge\).*mua sweep"):
        predict_rank(fit, "A:1", 256)
    with pytest.raises(MuaError, match=r"no trials for regime B:sqrt.*--regimes B:sqrt"):
        predict_rank(fit, "B:sqrt", 256)
    with pytest.raises(MuaError, match="unknown regime"):
        predict_rank(fit, "C:1", 256)
    with pytest.raises(MuaError, match="positive integer"):
        predict_rank(fit, "A:1", 0)


def test_full_from_b1_pooled_with_measured_evidence():
    fit = fit_run(trials({"B:1": 0.0, "A:r": 0.0}, seeds=(0, 1), noise=0.002, full_log2=LOG2C - 1.5))
    p = predict_full(fit)
    assert p.basis == "B:1-pooled" and p.target == "full-ft" and p.regime == "B:1"
    assert math.log2(p.lr) == pytest.approx(LOG2C, abs=0.05) and p.lo < p.lr < p.hi
    assert p.settings["method"] == "full finetuning" and p.peft is None
    ev = p.evidence
    assert ev["measured_full_lr"] == pytest.approx(2 ** (LOG2C - 1.5), rel=0.05)
    assert ev["ratio"] == pytest.approx(2**1.5, rel=0.1) and "not 1" in ev["calibrated"]
    assert predict_full(fit, heuristic=True).basis == "B:1-pooled"  # μA wins when B:1 is there
    assert predict_full(fit_run(trials({"B:1": 0.0}))).evidence is None


def test_full_needs_b1_and_heuristic_is_labelled():
    fit = fit_run(trials({"A:r": 0.0, "A:1": -0.5}, noise=0.002))
    with pytest.raises(MuaError, match=r"no B:1 trials.*--regimes B:1.*--heuristic"):
        predict_full(fit)
    with pytest.raises(MuaError) as e:
        predict_full(fit_run(trials({"A:1": -0.5})), heuristic=True)
    assert "--regimes B:1" in str(e.value)
    h = predict_full(fit, heuristic=True)
    pooled = np.mean(fit.regimes["A:r"].log2_lr_stars)
    assert math.log2(h.lr) == pytest.approx(pooled - math.log2(10), abs=1e-9)
    assert h.basis == "heuristic" and h.regime == "A:r"
    assert "LoRA Without Regret" in h.reason and "not μA" in h.reason


def test_json_schema_and_settings():
    fit = fit_run(trials({"A:1": -0.5, "B:1": 0.0}, full_log2=-9.0))
    p = predict_rank(fit, "A:1", 256)
    d = json.loads(json.dumps(p.to_dict(), allow_nan=False))
    assert KEYS <= set(d) and d["caveat"] == CAVEAT
    assert d["target"] == 256 and d["basis"] in ("muA-slope", "free-slope")
    lo, hi = d["interval"]
    assert lo < d["lr"] < hi
    s = d["settings"]
    assert (s["lora_alpha"], s["use_rslora"], s["rank"]) == (256.0, False, 256)
    assert s["steps"] == 100 and s["batch_size"] == 8 and "AdamW" in s["optimizer"] and s["schedule"]
    assert "LoraConfig(r=256, lora_alpha=256, use_rslora=False)" in d["peft"]
    b = predict_rank(fit, "B:1", 64).to_dict()
    assert "zero every lora_A" in b["peft"] and "lora_B ~ N(0, 1/r)" in b["peft"]
    f = json.loads(json.dumps(predict_full(fit).to_dict(), allow_nan=False))
    assert KEYS <= set(f) and f["target"] == "full-ft" and f["settings"]["method"] == "full finetuning"
    assert f["evidence"]["ratio"] > 0


def test_predictions_survive_the_fit_json_round_trip():
    fit = fit_run(trials({"A:1": -0.5, "B:1": 0.0}, seeds=(0, 1), noise=0.003, full_log2=-9.0))
    back = FitResult.from_dict(json.loads(json.dumps(fit.to_dict(), allow_nan=False)))
    assert predict_rank(back, "A:1", 512).to_dict() == predict_rank(fit, "A:1", 512).to_dict()
    assert predict_full(back).to_dict() == predict_full(fit).to_dict()


def test_full_lr_is_labelled_once_in_the_evidence():
    fit = fit_run(trials({"B:1": 0.0}, seeds=(0, 1), noise=0.002, full_log2=LOG2C - 1.5))
    text = predict_full(fit).evidence["calibrated"]
    number = f"{fit.full_vs_b1.full_lr:.3g}"
    assert f"η*_full = {number};" in text and text.count(number) == 1
    on_grid = fit_run(trials({"B:1": 0.0}, full_log2=-9.0))  # η*_full exactly 2^-9: label and number
    assert "η*_full = 2^-9 (0.00195);" in predict_full(on_grid).evidence["calibrated"]


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_settings_carry_task_dtype_targets_per_layer_lr_and_head_lr(task):
    from mua_cli.report import prediction_panel

    rec = {**RECIPE, "task": task, "dtype": "bfloat16", "targets": ["q_proj", "v_proj"], "per_layer_lr": True,
           "head_lr": 0.002}  # fmt: skip
    df = trials({"B:1": 0.0})
    fit = fit_run(df.assign(recipe=[rec] * len(df)))
    s = predict_rank(fit, "B:1", 256).settings
    assert (s["task"], s["dtype"], s["targets"], s["per_layer_lr"]) == (task, "bfloat16", ["q_proj", "v_proj"], True)
    f = predict_full(fit).settings
    assert (f["task"], f["dtype"], f["per_layer_lr"]) == (task, "bfloat16", True) and "targets" not in f
    if task == "seq-cls":
        assert s["head_lr"] == f["head_lr"] == 0.002
    else:  # a causal LM has no classification head: head_lr means nothing there
        assert "head_lr" not in s and "head_lr" not in f
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(prediction_panel(predict_rank(fit, "B:1", 256)))
    out = console.export_text()
    assert "targets: q_proj, v_proj" in out and f"task: {task}" in out and "dtype: bfloat16" in out
    legacy = FitResult.from_dict(
        {**fit.to_dict(), "settings": {k: v for k, v in fit.settings.items() if k != "recipe"}}
    )
    assert "task" not in predict_rank(legacy, "B:1", 256).settings  # an older fit.json: simply absent


def test_one_degree_of_freedom_is_said_plainly():
    from rich.console import Console

    from mua_cli.report import fit_tables

    two = fit_run(trials({"A:1": -0.5, "B:1": 0.0}, ranks=(4, 64)))  # pooled / μA-line intervals: t(1)
    for p in (predict_rank(two, "A:1", 256), predict_full(two)):
        assert any("1 degree of freedom" in n and "t = 12.7" in n for n in p.notes), p.notes
    assert "1 degree of freedom" in two.regimes["A:1"].note
    three = fit_run(trials({"A:r": 0.0}, ranks=(4, 16, 64), noise=0.002))  # the free slope: t(1)
    assert three.regimes["A:r"].dof == 1 and "the slope rests on 3 usable ranks" in three.regimes["A:r"].note
    console = Console(record=True, width=300)
    for table in fit_tables(three):
        console.print(table)
    assert "note (A:r): the slope rests on 3 usable ranks" in console.export_text()
    four = fit_run(trials({"A:r": 0.0}))  # 2 dof: no such note
    assert four.regimes["A:r"].note is None and not predict_rank(four, "A:r", 256).notes
