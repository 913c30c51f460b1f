"""transfer.py: answers at a target rank and for full finetuning, from fits of synthetic sweeps with known truths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from synthetic import LOG2C, RECIPE, trials, truth

from mua_cli.errors import MuaError
from mua_cli.science import calibration as cal
from mua_cli.science.anchor import ANCHOR_LABELS, anchor_value
from mua_cli.science.fit import FitResult, fit_run
from mua_cli.science.full_ft import predict_full, study_ratio
from mua_cli.science.transfer import CAVEAT, predict_rank


@pytest.fixture(autouse=True)
def power_law_truth(monkeypatch):
    """The synthetic optima follow a pure power law in rank: no study curvature unless a test sets one."""
    monkeypatch.setattr(cal, "RANK_CURVATURE", {})


KEYS = {"lr", "interval", "target", "regime", "basis", "reason", "ranks_used", "settings", "caveat", "evidence"}


def half_width(p) -> float:
    return math.log2(p.hi / p.lo) / 2


def inside(p, x: float) -> bool:
    return math.log2(p.lo) <= x <= math.log2(p.hi)


def test_measured_rank_beats_predicted_and_carries_the_prediction_as_evidence():
    fit = fit_run(trials({"B:1": -0.3}, noise=0.01, asym=2.0))
    p = predict_rank(fit, "B:1", 256)
    assert p.basis == "measured" and "measured beats predicted" in p.reason
    assert inside(p, truth(LOG2C, -0.3, 256))
    ev = p.evidence["predicted_without_this_rank"]
    assert ev["basis"] == cal.RANK_BASIS and ev["ratio_measured_to_predicted"] == pytest.approx(1, abs=0.35)
    forced = predict_rank(fit, "B:1", 256, basis="predict")
    assert forced.basis == cal.RANK_BASIS and forced.evidence["measured_lr"] == pytest.approx(p.lr)


def test_rank_256_from_ranks_4_to_64_lands_in_its_interval_in_40_repeats():
    """Known non-zero slope, asymmetric curves, seed shifts, noise and per-rank scatter; rank 256 held out."""
    hits, errors, widths = 0, [], []
    for rng in range(40):
        df = trials({"B:1": -0.3}, ranks=(4, 16, 64), noise=0.01, asym=2.5, seed_shift=0.01, jitter=0.1, rng=rng)
        p = predict_rank(fit_run(df), "B:1", 256)
        assert p.basis == cal.RANK_BASIS and any("extrapolates" in n for n in p.notes)
        true = truth(LOG2C, -0.3, 256) + 0.0  # the jitter of a held-out rank is part of what is predicted
        hits += inside(p, true)
        errors.append(abs(math.log2(p.lr) - true))
        widths.append(2 * half_width(p))
    assert hits >= 36, hits
    assert np.median(errors) < 0.5  # within √2
    assert np.median(widths) < 2.0  # a factor of 2 each way at most


def test_shrinkage_beats_mua_slope_when_the_slope_is_not_mua():
    # η* ∝ r^-0.5 labelled B:1 (μA: 0): μA's slope would mispredict rank 4096 by 2^-5
    fit = fit_run(trials({"B:1": -0.5}, ranks=(4, 16, 64, 256), seeds=(0, 1), noise=0.005, rng=2))
    true = truth(LOG2C, -0.5, 4096)
    shrunk = predict_rank(fit, "B:1", 4096, basis="shrunk-slope")
    mua = predict_rank(fit, "B:1", 4096, basis="muA-slope")
    assert inside(shrunk, true) and not inside(mua, true)
    assert abs(math.log2(shrunk.lr) - true) < 0.5
    assert "shrunk toward μA's" in shrunk.reason and "labelled" in mua.reason
    nearer = predict_rank(fit, "B:1", 512, basis="shrunk-slope")
    assert half_width(nearer) < half_width(shrunk)  # farther, wider


def test_one_usable_rank_predicts_on_mua_slope_with_the_study_spread():
    fit = fit_run(trials({"A:1": -0.5}, ranks=(4, 16, 64), grid=range(-10, -3)))  # r ≥ 16 at the low edge
    p = predict_rank(fit, "A:1", 256)
    assert p.basis == "shrunk-slope" and "one usable rank" in p.reason
    assert math.log2(p.lr) == pytest.approx(truth(LOG2C, -0.5, 4) - 0.5 * 6, abs=0.05)
    assert half_width(p) > 1.96 * cal.SLOPE_PRIOR_SD * 6 * 0.99
    with pytest.raises(MuaError, match=r"1 usable rank.*a measured slope needs 2.*16 \(low edge\)"):
        predict_rank(fit, "A:1", 256, basis="measured-slope")


def test_rank_errors():
    fit = fit_run(trials({"A:1": -0.5}, ranks=(4, 16, 64), grid=range(-12, -3)))
    with pytest.raises(MuaError, match=r"no trials for regime B:sqrt.*--regimes B:sqrt"):
        predict_rank(fit, "B:sqrt", 256)
    with pytest.raises(MuaError, match="unknown regime"):
        predict_rank(fit, "C:1", 256)
    with pytest.raises(MuaError, match="positive integer"):
        predict_rank(fit, "A:1", 0)
    with pytest.raises(MuaError, match="does not apply to a rank target"):
        predict_rank(fit, "A:1", 256, basis="calibrated")
    with pytest.raises(MuaError, match="no interior optimum for A:1 at rank 256"):
        predict_rank(fit, "A:1", 256, basis="measured")


def anchor_rank() -> int:
    """The rank whose B:1 cell the study's full-finetuning rule reads (calibration.FULL_ANCHOR)."""
    return {"cell16": cal.FULL_REF_RANK, "cell-max": cal.FULL_SOURCE_MAX_RANK}.get(cal.FULL_ANCHOR, cal.FULL_REF_RANK)


def anchor_label() -> str:
    rank = {"cell16": cal.FULL_REF_RANK, "cell-max": cal.FULL_SOURCE_MAX_RANK}.get(cal.FULL_ANCHOR)
    return f"B:1's η* at rank {rank}" if rank else ANCHOR_LABELS[cal.FULL_ANCHOR]


def anchor_lr(fit: FitResult) -> float:
    """B:1's η* read as the study's anchor, computed here from the fit: a cell of its table, or its line."""
    rank = {"cell16": cal.FULL_REF_RANK, "cell-max": cal.FULL_SOURCE_MAX_RANK}.get(cal.FULL_ANCHOR)
    if rank:
        return next(o for o in fit.optima_for("B:1") if o.rank == rank).lr_star
    b1 = fit.regimes["B:1"]
    assert max(b1.ranks_used) <= cal.FULL_SOURCE_MAX_RANK, "a fit over the study's source ranks only"
    return 2 ** anchor_value(b1, cal.FULL_ANCHOR)[0]


def test_full_ft_measured_beats_predicted():
    ref = truth(LOG2C, -0.3, anchor_rank())  # B:1 at the anchor's rank; full finetuning 2 octaves below
    fit = fit_run(trials({"B:1": -0.3, "A:r": 0.0}, seeds=(0, 1), noise=0.005, full_log2=ref - 2.0))
    p = predict_full(fit)
    assert p.basis == "measured" and p.regime == "full" and inside(p, ref - 2.0)
    assert p.settings["method"] == "full finetuning" and p.peft is None
    ev = p.evidence
    assert ev["measured_full_lr"] == pytest.approx(p.lr)
    assert ev["predicted_basis"] == "study-offset"
    study = study_ratio(fit, fit.regimes["B:1"])
    assert ev["ratio_predicted_to_measured"] == pytest.approx(2 ** (2.0 - study.log2), rel=0.15)
    assert ev["b1_over_full"] == pytest.approx(4.0, rel=0.15) and ev["b1_over_full_from"] == "measured"
    lo, hi = ev["b1_over_full_interval"]
    assert lo < ev["b1_over_full"] < hi
    lo, hi = ev["predicted_interval"]
    assert lo < ev["predicted"] < hi
    assert predict_full(fit, basis="predict").basis == "study-offset"


def test_full_ft_without_full_trials_divides_the_anchor_by_the_study_ratio_labelled_empirical():
    ref = truth(LOG2C, -0.3, anchor_rank())
    fit = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), seeds=(0, 1), noise=0.005))
    p = predict_full(fit)
    assert p.basis == "study-offset" and "empirical" in p.reason
    study = study_ratio(fit, fit.regimes["B:1"])
    assert math.log2(p.lr) == pytest.approx(ref - study.log2, abs=0.15)
    assert half_width(p) >= 1.96 * study.se * 0.99  # the ratio's spread is in the interval
    ev = p.evidence  # the anchor is the number `mua fit` shows under the same name
    assert ev["b1_lr"] == pytest.approx(anchor_lr(fit)) and ev["anchor"] == anchor_label()
    assert ev["b1_over_full"] == pytest.approx(study.ratio) and ev["b1_over_full_from"] == "study"
    assert p.lr == pytest.approx(ev["b1_lr"] / ev["b1_over_full"])
    raw = predict_full(fit, basis="muA-B:1")
    assert raw.basis == "muA-B:1" and "μA's raw rule" in raw.reason
    assert raw.lr > p.lr  # the raw 1:1 rule sits above: B:1 ≠ full in the study


def test_full_ft_anchor_reads_the_studys_source_ranks_and_falls_back_to_the_line():
    """A run that swept past rank 64 reads B:1 where the study did; one without the anchor's cell uses the line."""
    wide = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64, 256), seeds=(0, 1), noise=0.005))
    p = predict_full(wide)
    narrow = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), seeds=(0, 1), noise=0.005))
    # rank 256 does not move the anchor (the loss noise is pooled over the ranks swept: not to the last digit)
    assert p.evidence["b1_lr"] == pytest.approx(anchor_lr(narrow), rel=0.02)
    low = fit_run(trials({"B:1": -0.3}, ranks=(2, 4, 8), seeds=(0, 1), noise=0.005))
    q = predict_full(low)
    assert q.evidence["anchor"] == f"B:1's fitted line at rank {anchor_rank()}"
    if cal.FULL_ANCHOR.startswith("cell"):  # a cell the run lacks: the line stands in, said in a note
        assert any("stands in" in n for n in q.notes)
    assert math.log2(q.evidence["b1_lr"]) == pytest.approx(truth(LOG2C, -0.3, anchor_rank()), abs=0.3)


def test_full_ft_calibrated_on_a_proxy_run():
    # proxy: another model whose full-ft optimum sits 1.2 octaves below its B:1 at the anchor's rank
    r = anchor_rank()
    proxy_ref = truth(-7.0, -0.2, r)
    proxy = fit_run(trials({"B:1": -0.2}, seeds=(0, 1), noise=0.005, log2c=-7.0, full_log2=proxy_ref - 1.2))
    target = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), seeds=(0, 1), noise=0.005))
    p = predict_full(target, calibration=proxy)
    assert p.basis == "calibrated" and "--calibrate run" in p.reason
    assert math.log2(p.lr) == pytest.approx(truth(LOG2C, -0.3, r) - 1.2, abs=0.2)
    assert p.evidence["b1_over_full"] == pytest.approx(2**1.2, rel=0.12)
    assert p.evidence["b1_over_full_from"] == "--calibrate"
    with pytest.raises(MuaError, match="no usable B:1 and full-finetuning optima"):
        predict_full(target, calibration=target)
    with pytest.raises(MuaError, match="needs --calibrate"):
        predict_full(target, basis="calibrated")


def test_full_needs_b1_and_heuristic_is_labelled():
    fit = fit_run(trials({"A:r": 0.0, "A:1": -0.5}, noise=0.002))
    with pytest.raises(MuaError, match=r"no B:1 trials.*--regimes B:1.*--heuristic"):
        predict_full(fit)
    with pytest.raises(MuaError) as e:
        predict_full(fit_run(trials({"A:1": -0.5})), heuristic=True)
    assert "--regimes B:1" in str(e.value)
    h = predict_full(fit, heuristic=True)
    rf = fit.regimes["A:r"]
    assert math.log2(h.lr) == pytest.approx(rf.intercept_mua - math.log2(10), abs=1e-9)
    assert h.basis == "heuristic" and h.regime == "A:r"
    assert "LoRA Without Regret" in h.reason and "not μA" in h.reason
    with pytest.raises(MuaError, match="no measured full-finetuning optimum"):
        predict_full(fit, basis="measured")


def test_json_schema_and_settings():
    fit = fit_run(trials({"A:1": -0.5, "B:1": 0.0}, full_log2=-9.0))
    p = predict_rank(fit, "A:1", 1024)
    d = json.loads(json.dumps(p.to_dict(), allow_nan=False))
    assert KEYS <= set(d) and d["caveat"] == CAVEAT
    assert d["target"] == 1024 and d["basis"] == cal.RANK_BASIS
    lo, hi = d["interval"]
    assert lo < d["lr"] < hi
    s = d["settings"]
    assert (s["lora_alpha"], s["use_rslora"], s["rank"]) == (1024.0, False, 1024)
    assert s["steps"] == 100 and s["batch_size"] == 8 and "AdamW" in s["optimizer"] and s["schedule"]
    # the whole LoraConfig the sweep trained with, targets included, and the init that goes with it
    assert (
        "LoraConfig(r=1024, lora_alpha=1024, use_rslora=False, target_modules='all-linear', lora_dropout=0" in d["peft"]
    )
    assert d["lora_config"] == {"r": 1024, "lora_alpha": 1024, "use_rslora": False, "target_modules": "all-linear",
                                "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    b = predict_rank(fit, "B:1", 64).to_dict()
    assert "apply_regime(model, 'B:1')" in b["peft"] and "A = 0, B ~ N(0, 1/r)" in b["peft"]
    f = json.loads(json.dumps(predict_full(fit).to_dict(), allow_nan=False))
    assert KEYS <= set(f) and f["target"] == "full-ft" and f["settings"]["method"] == "full finetuning"
    assert f["basis"] == "measured" and f["evidence"]["b1_over_full"] > 0


def test_predictions_survive_the_fit_json_round_trip():
    fit = fit_run(trials({"A:1": -0.5, "B:1": 0.0}, seeds=(0, 1), noise=0.003, full_log2=-9.0))
    back = FitResult.from_dict(json.loads(json.dumps(fit.to_dict(), allow_nan=False)))
    assert predict_rank(back, "A:1", 512).to_dict() == predict_rank(fit, "A:1", 512).to_dict()
    for basis in ("auto", "predict", "muA-B:1"):
        assert predict_full(back, basis=basis).to_dict() == predict_full(fit, basis=basis).to_dict()


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_settings_carry_task_dtype_targets_per_layer_lr_and_head_lr(task):
    from mua_cli.ui.report import prediction_panel

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


def test_study_curvature_carries_a_bending_optimum_to_rank_256(monkeypatch):
    # η* bends down at high rank, as Init[B] did in the study: log2 η* = c + s·x + k·(x − 4)², x = log2 r
    k = -0.05
    df = trials({"B:1": -0.2}, ranks=(4, 16, 64, 256), seeds=(0, 1), noise=0.005)
    x = np.log2(df["rank"].clip(lower=1))
    shift = np.where(df["regime"] == "B:1", k * (x - 4) ** 2, 0.0)
    df["lr"] = df["lr"] * 2.0**shift  # move every point of a curve with its optimum: the loss curve's shape stays
    true = truth(LOG2C, -0.2, 256) + k * 16
    src = df[df["rank"] < 256]
    flat = predict_rank(fit_run(src), "B:1", 256)
    monkeypatch.setattr(cal, "RANK_CURVATURE", {"B:1": (k, 0.01)})
    bent = predict_rank(fit_run(src), "B:1", 256)
    assert abs(math.log2(bent.lr) - true) < 0.15 < abs(math.log2(flat.lr) - true)
    assert inside(bent, true) and not inside(flat, true)


def test_full_ft_with_a_ratio_model_reads_the_runs_slope(monkeypatch):
    """Where the study chose a model of the ratio in the run's features, the ratio follows the run's B:1 slope."""
    model = {"kind": "slope", "columns": ["slope"], "coef": [1.5, -1.0], "cov": [[0.1, 0.0], [0.0, 0.5]],
             "s": 0.2, "dof": 10.0, "mean": None, "sd": None}  # fmt: skip
    monkeypatch.setattr(cal, "B1_OVER_FULL_MODEL", model)
    fit = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), seeds=(0, 1), noise=0.005))
    p = predict_full(fit, basis="predict")
    slope = fit.regimes["B:1"].slope
    log2_ratio = 1.5 - 1.0 * slope
    assert p.evidence["b1_over_full"] == pytest.approx(2**log2_ratio)
    assert p.lr == pytest.approx(p.evidence["b1_lr"] / 2**log2_ratio)
    assert f"B:1's measured slope over ranks ≤ 64, {slope:+.3f}" in p.reason
    v = np.array([1.0, slope])
    se_ratio = 0.2 * math.sqrt(1 + v @ np.array(model["cov"]) @ v)
    assert half_width(p) > 2.2 * se_ratio  # t(10) quantile, wider than the normal's
