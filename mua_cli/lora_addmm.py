"""LoRA's scale-and-add folded into its second matrix multiply: `addmm(base_out, h, Bᵀ, alpha=scaling)` in place
of peft's `base_out + lora_B(h) * scaling`.

Why: peft's form makes two more passes over the layer's whole output in the forward (the scale, then the add)
and one in the backward (the scale's gradient), per adapted layer; a GEMM with alpha and beta does both in its
epilogue, and its backward scales only the small [tokens, rank] and [rank, out] gradients. The arithmetic is
the same up to rounding (one rounding instead of three); tests/test_lora_addmm.py checks outputs and
gradients against peft's for serial and batched adapters.

`whole_layer` (mua's choice on a GPU) goes further for a LoRA layer over a frozen nn.Linear: base and adapter
in one autograd function (`_LoraLinear`) whose forward adds the adapter into the base's output in place, and
whose backward adds the adapter's input gradient into the base's inside the GEMM (`addmm_`), instead of
autograd adding two whole input gradients. Measured on an H200 (365M, one trial; docs/performance.md): an
out-of-place addmm copies its whole `base_out` first (one device-to-device copy per adapted layer, 2.3 ms per
step), and autograd's gradient sums were 168 of the step's adds.

Only plain LoRA layers take this path (peft's Linear with one active adapter, no dropout, no variant such as
DoRA, not merged); anything else runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


def fold_lora_adds(model: torch.nn.Module, whole_layer: bool = False) -> int:
    """Gives every plain LoRA linear layer of `model` the folded forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # subclasses (quantized, variants) keep peft's forward
            module.forward = types.MethodType(_forward, module)
            module.mua_whole_layer = whole_layer
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
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    frozen_linear = type(base) is torch.nn.Linear and not any(p.requires_grad for p in base.parameters())
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if getattr(self, "mua_whole_layer", False) and frozen_linear and base.weight.dtype == dtype:
        return _LoraLinear.apply(x.to(dtype), base.weight, base.bias, a.to(dtype), b.to(dtype), self.scaling[name])
    result = base(x)
    h = self.lora_A[name](self._cast_input_dtype(x, a.dtype))
    out_features, rank, scaling = result.shape[-1], h.shape[-1], self.scaling[name]
    b = b.to(result.dtype)  # under autocast: the in-place op below is not autocast's to cast
    if b.dim() == 2:  # [out, rank]
        op, c, h, bt = "addmm", result.reshape(-1, out_features), h.reshape(-1, rank), b.t()
    else:  # batched.StackedLinear: [K, out, rank], rows grouped by trial
        k = b.shape[0]
        op, c, h, bt = "baddbmm", result.reshape(k, -1, out_features), h.reshape(k, -1, rank), b.transpose(1, 2)
    # c then views the base's fresh output, which nothing saved for its backward: add into it in place
    if frozen_linear and result.is_contiguous():
        getattr(c, op + "_")(h, bt, alpha=scaling)
        return result
    return getattr(torch, op)(c, h, bt, alpha=scaling).view(result.shape)


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + bias + scaling · (x Aᵀ) Bᵀ over a frozen W, every tensor in one dtype; A and B are [rank, in]
    and [out, rank], or [K, ·, ·] for K batched trials whose rows are grouped by trial (batched.py)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, scaling):
        with torch.autocast(x.device.type, enabled=False):
            y = torch.nn.functional.linear(x, w, bias)
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            if a.dim() == 2:
                h = x2 @ a.t()
                y2.addmm_(h, b.t(), alpha=scaling)
            else:
                k = a.shape[0]
                h = torch.bmm(x2.view(k, -1, x2.shape[-1]), a.transpose(1, 2))
                y2.view(k, -1, y2.shape[-1]).baddbmm_(h, b.transpose(1, 2), alpha=scaling)
        ctx.save_for_backward(x, w, a, b, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, h = ctx.saved_tensors
        s = ctx.scaling
        g, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
        if a.dim() == 2:
            gh = g @ (b * s)  # [n, rank]
            ga, gb = gh.t() @ x2, torch.mm(g.t(), h).mul_(s)
        else:
            k = a.shape[0]
            gk, xk = g.reshape(k, -1, g.shape[-1]), x2.reshape(k, -1, x2.shape[-1])
            gh = torch.bmm(gk, b * s)  # [K, n, rank]
            ga, gb = torch.bmm(gh.transpose(1, 2), xk), torch.bmm(gk.transpose(1, 2), h).mul_(s)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g @ w
            if a.dim() == 2:
                gx.addmm_(gh, a)
            else:
                gx.view(k, -1, gx.shape[-1]).baddbmm_(gh, a)
            gx = gx.view(x.shape)
        return gx, None, None, ga, gb, None
