"""LoRA's scale-and-add folded into its second matrix multiply: `addmm(base_out, h, Bᵀ, alpha=scaling)` in place
of peft's `base_out + lora_B(h) * scaling`.

Why: peft's form makes two more passes over the layer's whole output in the forward (the scale, then the add)
and one in the backward (the scale's gradient), per adapted layer; a GEMM with alpha and beta does both in its
epilogue, and its backward scales only the small [tokens, rank] and [rank, out] gradients. The arithmetic is
the same up to rounding (one rounding instead of three); tests/test_lora_addmm.py checks outputs and
gradients against peft's for serial and batched adapters.

Only plain LoRA layers take this path (peft's Linear with one active adapter, no dropout, no variant such as
DoRA, not merged); anything else runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


def fold_lora_adds(model: torch.nn.Module) -> int:
    """Gives every plain LoRA linear layer of `model` the folded forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # subclasses (quantized, variants) keep peft's forward
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n


def _forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (
        name is not None
        and not (args or kwargs or self.disable_adapters or self.merged)
        and name in self.lora_A
        and name not in self.lora_variant
        and isinstance(self.lora_dropout[name], torch.nn.Identity)
    )
    autocast = torch.is_autocast_enabled(x.device.type)
    if plain and not autocast:  # without autocast, addmm needs the base's output and the adapter in one dtype
        plain = getattr(getattr(self.base_layer, "weight", None), "dtype", None) == self.lora_B[name].weight.dtype
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    h = self.lora_A[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype))
    w = self.lora_B[name].weight
    out_features, rank = result.shape[-1], h.shape[-1]
    if w.dim() == 2:  # [out, rank]
        out = torch.addmm(result.reshape(-1, out_features), h.reshape(-1, rank), w.t(), alpha=self.scaling[name])
    else:  # batched.StackedLinear: [K, out, rank], rows grouped by trial
        k = w.shape[0]
        out = torch.baddbmm(
            result.reshape(k, -1, out_features), h.reshape(k, -1, rank), w.transpose(1, 2), alpha=self.scaling[name]
        )
    return out.view(result.shape)
