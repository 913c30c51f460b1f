"""GPU speed-ups that change no result beyond floating-point rounding: CUDA-graph steps (graphed), attention
kernels (attention), Liger's fused kernels (fused), LoRA GEMMs (lora_gpu, lora_addmm).

A training loop gets them through two calls: `prepare` for the model's forward, `step` for the step itself.
Knows models and tensors, not recipes or trials. May import: torch, peft, transformers; nothing of mua's
outside this folder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def is_gpu(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")


def prepare(model: torch.nn.Module, device: str, unpadded: bool, seq_len: int) -> None:
    """The forward's speed-ups for training on `device`, in place. Each computes the same arithmetic; on a GPU
    the whole-layer LoRA function rounds at other places (bf16: tests/test_lora_addmm.py). `unpadded`: no
    training batch holds padding (a causal LM's windows, images), so attention runs without a mask tensor."""
    from .attention import drop_mask
    from .lora_addmm import fold_lora_adds
    from .lora_gpu import precast_adapters

    gpu = is_gpu(device)
    fold_lora_adds(model, whole_layer=gpu)
    if not gpu:
        return
    precast_adapters(model)
    skip_input_casts(model)
    if unpadded:
        drop_mask(model, seq_len)


def skip_input_casts(model: torch.nn.Module) -> None:
    """Under bf16 autocast peft casts each LoRA input to the adapter's fp32 and autocast casts it straight back
    for the matmul: an exact round trip that costs two copies per adapted layer, skipped."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False


def step(fn: Callable[[], None], model: torch.nn.Module, device: str, graphs: bool, on_note=None):
    """`fn`, one training step, as a callable `Step`: replayed as a CUDA graph on a GPU when `graphs`, with the
    attention kernels that suit `model`; a plain call on the CPU."""
    from .attention import step_kernels
    from .graphed import Step

    return Step(fn, device, graphs, on_note, step_kernels(model))
