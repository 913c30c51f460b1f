"""CUDA's start (the driver, the GPU's context) in a thread of its own, begun as soon as torch is imported, so
that it runs while the process goes on importing transformers and peft: a sweep on a GPU pays the longer of
the two, not their sum (benchmarks/startup.py measures both). The context is made in the allocator's first
call, which torch makes without holding Python's lock."""

from __future__ import annotations

import threading

import torch


def start_cuda(device: str) -> threading.Thread | None:
    """Starts `device`'s CUDA (`auto`, `cuda` and `cuda:N`; `cuda` and `auto` start the first GPU) in a daemon
    thread, or nothing for the CPU. Whatever fails there fails again, with its message, where the sweep first
    uses the GPU (sweep/trainer.py), so the thread says nothing."""
    if device == "cpu":
        return None
    index = device[5:] if device.startswith("cuda:") else "0"
    if not index.isdigit():
        return None  # a bad name: resolve_device says so

    def start() -> None:
        try:
            if torch.cuda.is_available() and int(index) < torch.cuda.device_count():
                torch.zeros(1, device=f"cuda:{index}")
        except Exception:  # noqa: BLE001, S110 — see the docstring
            pass

    thread = threading.Thread(target=start, name="mua-cuda-start", daemon=True)
    thread.start()
    return thread
