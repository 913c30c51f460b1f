"""CUDA's start (the driver, the GPU's context) in a thread of its own, begun as soon as torch is imported, so
that it runs while the process goes on importing transformers and peft: a sweep on a GPU pays the longer of
the two, not their sum (docs/performance.md: measured at 124m; benchmarks/startup.py times the parts). The
context is made inside a tensor's creation, which torch runs without holding Python's lock."""

from __future__ import annotations

import threading

import torch


def start_cuda(device: str) -> threading.Thread | None:
    """Starts `device`'s CUDA (`auto`, `cuda` and `cuda:N`; `cuda` and `auto` start the first GPU) in a daemon
    thread, or nothing for the CPU or a name it does not know (resolve_device says what is wrong with it).
    Whatever fails in the thread fails again, with its message, where the sweep first uses the GPU
    (sweep/trainer.py), so the thread says nothing."""
    index = device[5:] if device.startswith("cuda:") else "0" if device in ("auto", "cuda") else ""
    if not index.isdigit():
        return None

    def start() -> None:
        try:
            if torch.cuda.is_available() and int(index) < torch.cuda.device_count():
                torch.zeros(1, device=f"cuda:{index}")
        except Exception:  # noqa: BLE001, S110 — see the docstring
            pass

    thread = threading.Thread(target=start, name="mua-cuda-start", daemon=True)
    thread.start()
    return thread
