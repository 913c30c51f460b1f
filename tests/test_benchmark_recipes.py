"""The GPU benchmarks' recipes still pass the recipe's own checks: they run only on a lent GPU, where a recipe
that no longer validates costs a call (gpu_speed.py's did, once pretraining's steps had to be 1 or more)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_speed  # noqa: E402


@pytest.mark.parametrize("name", sorted(gpu_speed.SHAPES))
def test_gpu_speed_recipes_validate(name):
    recipe = gpu_speed.recipe_for(name, 100)
    assert recipe.optim.steps == 100 and recipe.model.config["hidden_size"] == gpu_speed.SHAPES[name]["hidden_size"]
