"""Shared fixtures: a tiny recipe that sweeps in seconds, and a per-session model cache."""

from __future__ import annotations

import pytest
import yaml

TINY_TEST_RECIPE = {
    "name": "micro",
    "description": "test recipe: a 1-layer width-32 byte-level Llama",
    "model": "embedded:tiny",
    "model_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
    "pretrain": {"steps": 30, "batch_size": 8, "lr": 0.003},
    "data": "embedded:britannica",
    "seq_len": 32,
    "steps": 12,
    "batch_size": 4,
    "ranks": "2,8",
    "regimes": "A:r,B:1",
    "lrs": "2^-9:2^-5",
    "max_extend": 1,
}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mua-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(model_cache, monkeypatch):
    monkeypatch.setenv("MUA_CACHE", str(model_cache))


@pytest.fixture
def micro_recipe_path(tmp_path):
    p = tmp_path / "micro.yaml"
    p.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    return p
