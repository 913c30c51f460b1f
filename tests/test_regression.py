"""A guard for the science: a small but real sweep of the embedded default (fixed seeds, CPU) whose fitted
rank exponents and optimal learning rates must stay where they were recorded.

The recorded values live in tests/data/regression_embedded.json. A change to training, the data, the adapters
or the fit that moves a recorded value outside this run's own 95 % interval, widened by the tolerances below,
fails this test. The interval is the run's measure of its own noise, which is what another CPU's floating-point
path perturbs; how far results move across machines was not measured. When a move is intended, re-record with
`MUA_RECORD_REGRESSION=1 .venv/bin/pytest tests/test_regression.py` and say why in the commit.
"""

import json
import math
import os
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mua_cli.ui.cli import app

RECORD = Path(__file__).parent / "data" / "regression_embedded.json"
SLOPE_TOL = 0.15  # on the fitted slope of log2 η* against log2 r, per regime
LOG2_LR_TOL = 0.5  # on log2 η* per (regime, rank): half a grid step
# The embedded default reduced to run in well under a minute on 2 CPU cores: width 64 (tiny.yaml: 128), 200 steps
# of pretraining (600), 60 finetuning steps (100), ranks 4, 16, 64, both regimes of `make run`, 7 LRs.
RECIPE = {
    "name": "regression",
    "description": "regression guard: a reduced embedded default",
    "model": "embedded:tiny",
    "model_config": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "pretrain": {"data": "embedded:shakespeare", "steps": 200, "batch_size": 16, "lr": 0.003},
    "data": "embedded:britannica",
    "seq_len": 64,
    "steps": 60,
    "batch_size": 8,
    "ranks": "4,16,64",
    "regimes": "A:r,B:1",
    "lrs": "2^-10:2^-4",
    "seeds": 1,
    "max_extend": 2,
}


def _sweep_and_fit(tmp_path: Path) -> dict:
    recipe = tmp_path / "regression.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["sweep", "--recipe", str(recipe), "--out", str(run), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["fit", str(run), "--json", "--no-plot"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    out = {}
    for name, reg in doc["regimes"].items():
        optima = sorted((o for o in doc["optima"] if o["regime"] == name and o["usable"]), key=lambda o: o["rank"])
        out[name] = {
            "slope": reg["slope"],
            "slope_interval": reg["slope_interval"],
            "expected_slope": reg["expected_slope"],
            "ranks_used": reg["ranks_used"],
            "log2_lr_stars": reg["log2_lr_stars"],
            "log2_intervals": [[math.log2(o["lo"]), math.log2(o["hi"])] for o in optima],
        }
    return out


def test_fitted_exponents_have_not_moved(tmp_path):
    measured = _sweep_and_fit(tmp_path)
    if os.environ.get("MUA_RECORD_REGRESSION"):
        import torch

        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(
            json.dumps(
                {
                    "recipe": RECIPE,
                    "torch": torch.__version__,
                    "slope_tol": SLOPE_TOL,
                    "log2_lr_tol": LOG2_LR_TOL,
                    "regimes": measured,
                },
                indent=2,
            )  # fmt: skip
            + "\n"
        )
    recorded = json.loads(RECORD.read_text())
    assert recorded["recipe"] == RECIPE, "the regression recipe changed: re-record (see the module docstring)"
    # Portable: a result moves with the CPU's floating-point path, so each check allows the larger of a fixed
    # tolerance and the fit's own 95 % interval (what this run says its noise is), never less.
    for name, rec in recorded["regimes"].items():
        got = measured[name]
        assert set(rec["ranks_used"]) <= set(got["ranks_used"]) or len(got["ranks_used"]) >= 2, (
            f"{name}: usable ranks {got['ranks_used']}, recorded {rec['ranks_used']}"
        )
        assert got["slope"] is not None and math.isfinite(got["slope"])
        lo, hi = got["slope_interval"]
        assert lo - SLOPE_TOL <= rec["slope"] <= hi + SLOPE_TOL, (
            f"{name}: slope {got['slope']:+.3f} [{lo:+.3f}, {hi:+.3f}], recorded {rec['slope']:+.3f} (±{SLOPE_TOL})"
        )
        got_at = dict(
            zip(got["ranks_used"], zip(got["log2_lr_stars"], got["log2_intervals"], strict=True), strict=True)
        )
        for rank, b in zip(rec["ranks_used"], rec["log2_lr_stars"], strict=True):
            if rank not in got_at:
                continue
            a, (lo, hi) = got_at[rank]
            assert lo - LOG2_LR_TOL <= b <= hi + LOG2_LR_TOL, (
                f"{name} r={rank}: log2 η* {a:.2f} [{lo:.2f}, {hi:.2f}], recorded {b:.2f} (±{LOG2_LR_TOL})"
            )
