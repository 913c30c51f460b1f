"""Attention with no mask tensor where no batch is padded, so that a captured training step keeps the fast
attention kernels.

A causal LM's training batches are whole windows with no padding, so its mask is plain causal and SDPA's
`is_causal=True` is exact; an image classifier's batches are whole images, so its mask is all ones. transformers
skips building the mask in both cases, except while a CUDA stream is capturing: in the captured step it builds
an explicit [batch, 1, seq, seq] mask, and with an explicit mask SDPA cannot use flash attention, nor cuDNN's:
a causal LM's step fell back to memory-efficient attention, a ViT's to the math kernel, which on a bf16 model
computes in fp32 (docs/performance.md has the measurements).

transformers' own extension point does it: an attention implementation registered under mua's name that is
transformers' SDPA function itself, with no mask function registered, so that no mask is made
(masking_utils: "custom attention without equivalent mask creation: we don't need a mask").

On a GPU a mask-free trial steps and evaluates with cuDNN's fused attention first in SDPA's order (flash
next): faster than flash attention (docs/performance.md). Captured with an explicit mask, cuDNN's kernel
gave NaN losses where eager steps finish; without a mask it agrees with flash attention (measurements in
docs/performance.md). So a model that keeps its mask (padded batches, sliding windows) runs without cuDNN's
kernel (`step_kernels`).

SDPA's choice of kernels is process-wide (torch keeps it in global flags), and a sweep steps on several GPUs
from one thread each (execute.py): two threads' own `sdpa_kernel` blocks would restore the flags under each
other. `kernels` makes them hold one setting together.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "mua_causal_sdpa"
GPU_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
GRAPH_SAFE = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # with a mask: no cuDNN

_held = threading.Condition()
_setting: dict = {"order": None, "count": 0, "context": None}


def step_kernels(model: torch.nn.Module) -> list[SDPBackend]:
    """The SDPA kernels a trial's steps and evaluation on a GPU run with, in order of preference."""
    return GPU_ORDER if getattr(_config(model), "_attn_implementation", None) == NAME else GRAPH_SAFE


def model_kernels(model: torch.nn.Module, device: str):
    """What a trial's evaluation runs under: its steps' kernels on a GPU (so that no thread's setting differs)."""
    return kernels(step_kernels(model)) if device.startswith("cuda") else nullcontext()


def _sdpa(order: list[SDPBackend]):
    """SDPA's kernels in `order`; an older torch without `set_priority` keeps its own order among them."""
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order)


@contextmanager
def kernels(order: list[SDPBackend]) -> Iterator[None]:
    """`sdpa_kernel(order)` for every thread inside at once: set by the first thread in, undone by the last out.
    A thread that asks for another order waits until the held one is let go (a sweep's threads all train the
    same model, so they ask for the same one). Not reentrant across orders within one thread."""
    key = tuple(order)
    with _held:
        while _setting["count"] and _setting["order"] != key:
            _held.wait()
        if not _setting["count"]:
            _setting["context"], _setting["order"] = _sdpa(order), key
            _setting["context"].__enter__()
        _setting["count"] += 1
    try:
        yield
    finally:
        with _held:
            _setting["count"] -= 1
            if not _setting["count"]:
                _setting["context"].__exit__(None, None, None)
                _setting["context"] = _setting["order"] = None
                _held.notify_all()


def _config(model: torch.nn.Module):
    return getattr(model, "config", None)


def maskless_reason(model: torch.nn.Module, seq_len: int) -> str | None:
    """Why the mask cannot be dropped for this model, or None when it can."""
    config = _config(model)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return "the model does not use SDPA attention"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < seq_len:
        return f"sliding-window attention ({window} tokens < seq_len {seq_len})"
    if getattr(config, "attention_chunk_size", None) or getattr(config, "is_encoder_decoder", False):
        return "its attention is neither plain causal nor full"
    if any(t not in ("full_attention", "sliding_attention") for t in getattr(config, "layer_types", None) or []):
        return "its attention is neither plain causal nor full"
    return None


def drop_mask(model: torch.nn.Module, seq_len: int) -> bool:
    """Switches a model that trains on unpadded batches (a causal LM's `seq_len` windows, whole images) to
    mask-free SDPA, which keeps the model's own causal flag (on the trial's own copy of the model: its config is
    the copy's). Returns whether it applied; a model it cannot apply to is left as it is."""
    if maskless_reason(model, seq_len) is not None:
        return False
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # a transformers without the extension point: the model keeps its masks
        return False

    # transformers' SDPA function under mua's name, with no mask function registered (its kernels: step_kernels)
    AttentionInterface.register(NAME, sdpa_attention_forward)  # in transformers' global registry
    _config(model)._attn_implementation = NAME
    return True
