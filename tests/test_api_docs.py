"""docs/api.md and mua_cli.api agree: every public function is documented, the objects' field names are the
JSON's (`interval`, not lo/hi), and `run_sweep` picks its device as `mua sweep` does."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from mua_cli import api
from mua_cli.science.fit import FitResult
from mua_cli.science.transfer import Prediction

DOC = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()


def test_every_public_function_is_documented_and_every_documented_one_exists():
    functions = {n for n in api.__all__ if inspect.isfunction(getattr(api, n))}
    documented = set(re.findall(r"\*\*`(\w+)\(", DOC))
    assert functions - documented == set(), "public functions missing from docs/api.md"
    assert documented - functions == set(), "docs/api.md names functions mua_cli.api does not export"


def test_prediction_fields_are_the_json_keys():
    names = [f.name for f in dataclasses.fields(Prediction)]
    pred = Prediction(lr=1e-3, interval=(5e-4, 2e-3), target=16, regime="B:1", basis="measured", reason="",
                      ranks_used=[4], settings={})  # fmt: skip
    assert set(pred.to_dict()) == set(names)
    assert pred.to_dict()["interval"] == [5e-4, 2e-3] and "lo" not in names
    for name in names:
        assert f"`{name}`" in DOC, f"Prediction.{name} is not in docs/api.md"


def test_fit_result_fields_are_fit_json_keys():
    names = {f.name for f in dataclasses.fields(FitResult)}
    result = FitResult(settings={}, optima=[], regimes={})
    assert set(result.to_dict()) == names
    for name in names:
        assert f"`{name}`" in DOC, f"FitResult.{name} is not in docs/api.md"


def test_run_sweep_defaults_to_auto_like_the_cli():
    from mua_cli.ui.cli import sweep

    assert inspect.signature(api.run_sweep).parameters["device"].default == "auto"
    assert inspect.signature(sweep).parameters["device"].default == "auto"
