"""A guard for the science: a small but real sweep of the embedded default (fixed seeds, CPU) whose fitted
rank exponents and optimal learning rates must stay where they were recorded.

The recorded values live in tests/data/regression_embedded.json. A change to training, the data, the adapters
or the fit that moves them beyond the tolerances below fails this test. When such a move is intended, re-record
with `MUA_RECORD_REGRESSION=1 .venv/bin/pytest tests/test_regression.py` and say why in the commit.
"""

import json
import math
import os
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mua_cli.cli import app

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
        out[name] = {
            "slope": reg["slope"],
            "expected_slope": reg["expected_slope"],
            "ranks_used": reg["ranks_used"],
            "log2_lr_stars": reg["log2_lr_stars"],
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
    for name, rec in recorded["regimes"].items():
        got = measured[name]
        assert got["ranks_used"] == rec["ranks_used"], f"{name}: usable ranks {got['ranks_used']} != {rec}"
        assert got["slope"] is not None and math.isfinite(got["slope"])
        assert abs(got["slope"] - rec["slope"]) <= SLOPE_TOL, (
            f"{name}: slope {got['slope']:+.3f}, recorded {rec['slope']:+.3f} (tolerance ±{SLOPE_TOL})"
        )
        for rank, a, b in zip(rec["ranks_used"], got["log2_lr_stars"], rec["log2_lr_stars"], strict=True):
            assert abs(a - b) <= LOG2_LR_TOL, f"{name} r={rank}: log2 η* {a:.2f}, recorded {b:.2f}"
