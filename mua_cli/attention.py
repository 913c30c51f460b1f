"""Causal attention with no mask tensor, so that a captured training step keeps the fast attention kernels.

A causal LM's training batches are whole windows with no padding, so its mask is plain causal and SDPA's
`is_causal=True` is exact. transformers skips building the mask in that case, except while a CUDA stream is
capturing: in the captured step it builds an explicit [batch, 1, seq, seq] mask, and with an explicit mask
SDPA cannot use flash attention. Measured on an H200 (transformers 5.17, 365M Llama-shaped, one LoRA trial;
docs/performance.md): the graphed step ran memory-efficient attention, 15.9 ms per step, where the eager
steps' flash attention took 5.5 ms.

transformers' own extension point does it: an attention implementation registered under mua's name that is
transformers' SDPA function itself, with no mask function registered, so that no mask is made
(masking_utils: "custom attention without equivalent mask creation: we don't need a mask").

On a GPU that function runs with cuDNN's fused attention first in SDPA's order (flash next): 1.0 ms less per
365M step than flash attention (docs/performance.md). Captured with the explicit mask above, cuDNN's kernel
gave NaN losses in 7 of 24 B:1 trials of the embedded default; without a mask, all 24 finish, with flash
attention's best LRs (benchmarks/gpu_cudnn_b1_2026-11-29/). Masked attention (padded batches) never comes
here, and graphed.py keeps cuDNN out of it.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "mua_causal_sdpa"
GPU_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _gpu_order():
    """SDPA's kernels in GPU_ORDER; an older torch without `set_priority` keeps its own order among them."""
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(GPU_ORDER, set_priority=True)
    return sdpa_kernel(GPU_ORDER)


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
        return "its attention is not plain causal"
    if any(t not in ("full_attention", "sliding_attention") for t in getattr(config, "layer_types", None) or []):
        return "its attention is not plain causal"
    return None


def drop_causal_mask(model: torch.nn.Module, seq_len: int) -> bool:
    """Switches a causal LM that trains on unpadded `seq_len` windows to mask-free SDPA (on the trial's own
    copy of the model: its config is the copy's). Returns whether it applied; a model it cannot apply to is left
    as it is."""
    if maskless_reason(model, seq_len) is not None:
        return False
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # a transformers without the extension point: the model keeps its masks
        return False

    def causal_sdpa(module, query, *args, **kwargs):
        if not query.is_cuda:
            return sdpa_attention_forward(module, query, *args, **kwargs)
        with _gpu_order():
            return sdpa_attention_forward(module, query, *args, **kwargs)

    AttentionInterface.register(NAME, causal_sdpa)  # mua's name, in transformers' global registry
    _config(model)._attn_implementation = NAME
    return True
