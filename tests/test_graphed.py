"""accel/graphed.py's decisions that need no GPU to check (its captures and replays: tests/test_gpu.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mua_cli.accel import graphed


def test_a_capture_empties_the_cache_only_where_memory_is_short(monkeypatch):
    """accel/graphed.py: past half of what this process may hold, the GPU's memory or its cap where one is set."""
    gib = 2**30
    held = {"reserved": 30 * gib, "fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: held["fraction"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: held["reserved"])
    device = torch.device("cuda", 0)
    assert not graphed._memory_short(device)  # 30 of 80 GiB
    held["fraction"] = 0.5
    assert graphed._memory_short(device)  # 30 of a 40 GiB cap
    held["reserved"] = 10 * gib
    assert not graphed._memory_short(device)
