"""A fast first run: the default recipe's embedded model ships with the package (no pretraining), other
settings still pretrain and cache; CPU sweeps long enough run one single-thread slot per core, with the same
results as one slot."""

from __future__ import annotations

import fnmatch
import os
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TEST_RECIPE
from safetensors.torch import load_file

from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import grid_plan
from mua_cli.sweep.sizing import Execution, cpu_slots
from mua_cli.sweep.store import load_trials
from mua_cli.sweep.stream import run_sweep
from mua_cli.train import models

ROOT = Path(__file__).resolve().parent.parent


def _no_pretraining(*args, **kwargs):
    raise AssertionError("pretrained, but the weights ship with the package")


def test_default_recipe_loads_the_shipped_weights_without_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("MUA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "pretrain", _no_pretraining)
    recipe = load_recipe("tiny")
    folder = models.shipped_folder(recipe.model, recipe.data.seq_len)
    assert folder is not None and folder.parent == models.SHIPPED_DIR
    model = models.load_embedded(recipe.model, recipe.data.seq_len)
    shipped = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(shipped) and all(torch.equal(state[k], shipped[k]) for k in shipped)
    assert all(v.dtype == torch.float32 for v in shipped.values())
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    assert not (tmp_path / "cache").exists()  # nothing pretrained, nothing cached


def test_other_settings_still_pretrain_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MUA_CACHE", str(tmp_path / "cache"))
    micro = tmp_path / "micro.yaml"
    micro.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    # the default recipe with one setting of its model changed is not what was shipped
    for other in (
        load_recipe(str(micro)),
        load_recipe("tiny", pretrain={"steps": 599}),
        load_recipe("tiny", seq_len=32),
    ):
        assert models.shipped_folder(other.model, other.data.seq_len) is None
    calls = []
    real = models.pretrain
    monkeypatch.setattr(models, "pretrain", lambda *a: calls.append(1) or real(*a))
    recipe = load_recipe(str(micro))
    models.load_embedded(recipe.model, recipe.data.seq_len)
    assert calls == [1] and (models.embedded_folder(recipe.model, recipe.data.seq_len) / "model.safetensors").is_file()
    models.load_embedded(recipe.model, recipe.data.seq_len)  # cached now
    assert calls == [1]


def test_the_wheel_carries_the_shipped_weights():
    """pyproject.toml declares the embedded package and its files: a wheel (not only an editable install) has them."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "mua_cli.embedded" in conf["packages"]
    patterns = conf["package-data"]["mua_cli.embedded"]
    files = [p.relative_to(models.SHIPPED_DIR).as_posix() for p in models.SHIPPED_DIR.rglob("*") if p.is_file()]
    files = [f for f in files if "__pycache__" not in f]
    assert {"config.json", "model.safetensors", "settings.json"} <= {Path(f).name for f in files}
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files


def test_cpu_slots_one_per_core_for_long_sweeps_of_small_models(monkeypatch):
    tiny = load_recipe("tiny")
    n = 461_440  # the embedded default's parameters
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_slots(Execution("cpu"), tiny, n, len(grid_plan(tiny))) == 2
    assert cpu_slots(Execution("cpu"), tiny, n, 3) == 1  # a worker's start would not pay for itself
    assert cpu_slots(Execution("cpu"), tiny, 100e6, len(grid_plan(tiny))) == 1  # threads share larger matrices well
    assert cpu_slots(Execution("cpu", workers_per_gpu=3), tiny, n, 1) == 3  # as the user says
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_slots(Execution("cpu"), tiny, n, len(grid_plan(tiny))) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert cpu_slots(Execution("cpu"), tiny, n, len(grid_plan(tiny))) == 4


def test_two_cpu_slots_match_one_and_give_the_threads_back(micro_recipe_path, tmp_path):
    """This process and a worker process, one thread each: the same trials and metrics as one slot; afterwards
    this process has its threads back and OMP_NUM_THREADS is as it was."""
    recipe = load_recipe(str(micro_recipe_path), ranks="2", regimes="A:r,B:1", lrs="2^-8:2^-6", max_extend=0, refine=0)
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    one = run_sweep(recipe, tmp_path / "one", "cpu", execution=Execution("cpu", workers_per_gpu=1))
    two = run_sweep(recipe, tmp_path / "two", "cpu", execution=Execution("cpu", workers_per_gpu=2))
    assert one.ran == two.ran == 6
    assert torch.get_num_threads() == threads and os.environ.get("OMP_NUM_THREADS") == env
    a, b = (load_trials(tmp_path / r).sort_values("key").reset_index(drop=True) for r in ("one", "two"))
    assert list(a["key"]) == list(b["key"])
    assert list(a["status"]) == list(b["status"])
    assert list(b["metric"]) == pytest.approx(list(a["metric"]), rel=1e-6)
    assert set(b["device"]) == {"cpu"}
