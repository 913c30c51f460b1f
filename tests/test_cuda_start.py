"""CUDA started in a thread beside the imports (accel/cuda_start.py): the GPU the sweep will use, nothing for the
CPU, and silence where it fails (the sweep's own first use of the GPU says why)."""

import threading

import pytest
import torch

from mua_cli.accel.cuda_start import start_cuda


@pytest.fixture
def gpus(monkeypatch):
    """Two fake GPUs: the devices the thread touches, in order."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: touched.append(device))
    return touched


@pytest.mark.parametrize(
    ("device", "expected"),
    [("cuda", ["cuda:0"]), ("auto", ["cuda:0"]), ("cuda:1", ["cuda:1"]), ("cuda:2", []), ("cuda:x", []), ("tpu", [])],
)
def test_the_thread_starts_the_gpu_the_sweep_will_use(gpus, device, expected):
    thread = start_cuda(device)
    if thread is not None:
        thread.join(5)
    assert gpus == expected


@pytest.mark.parametrize("device", ["cpu", "tpu", "cuda:x"])
def test_no_thread_where_there_is_no_gpu_to_start(gpus, device):
    assert start_cuda(device) is None


def test_a_failed_start_says_nothing(monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("CUDA driver initialization failed")

    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch, "zeros", broken)
    start_cuda("cuda").join(5)
    assert uncaught == []
    assert capsys.readouterr() == ("", "")
