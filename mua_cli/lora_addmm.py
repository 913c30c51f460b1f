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
        return _LoraLinear.apply(x.to(dtype), base.weight, base.bias, a, b, self.scaling[name])
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
    """y = x Wᵀ + bias + scaling · (x Aᵀ) Bᵀ over a frozen W in x's dtype; A and B ([rank, in] and [out, rank],
    or [K, ·, ·] for K batched trials whose rows are grouped by trial, batched.py) in any float dtype: cast
    here, and their gradients come back in it.

    The order of the GEMMs is the point. Each of the adapter's whole-width products (its output, its input
    gradient) is written first, by a GEMM whose inner dimension is the rank, and the base's GEMM then adds
    into it (beta = 1): the base's GEMM is bound by arithmetic, so one more operand read in its epilogue costs
    little (4 µs of 48 at 365M), whereas a rank-r GEMM adding into the base's output must read and write all
    of it. The scaling rides on the two [tokens, rank] GEMMs (alpha), the adapter's gradients come out of
    their GEMMs in the adapter's dtype: no scale or cast kernels over whole tensors.
    """

    @staticmethod
    def forward(ctx, x, w, bias, a, b, scaling):
        dt, none = x.dtype, x.new_empty(())  # `none`: an addmm input that beta = 0 ignores
        with torch.autocast(x.device.type, enabled=False):
            a16, b16 = a.to(dt), b.to(dt)
            x2 = x.reshape(-1, x.shape[-1])
            if a.dim() == 2:
                hs = torch.addmm(none, x2, a16.t(), beta=0, alpha=scaling)  # scaling · x Aᵀ: [n, rank]
                y2 = torch.mm(hs, b16.t()) if bias is None else torch.addmm(bias, hs, b16.t())
            else:
                k = a.shape[0]
                hs = torch.baddbmm(none, x2.view(k, -1, x2.shape[-1]), a16.transpose(1, 2), beta=0, alpha=scaling)
                y2 = torch.bmm(hs, b16.transpose(1, 2)).view(x2.shape[0], -1)
                if bias is not None:
                    y2.add_(bias)
            y2.addmm_(x2, w.t())
        ctx.save_for_backward(x, w, a16, b16, hs)
        ctx.scaling, ctx.dtypes = scaling, (a.dtype, b.dtype)
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, w, a16, b16, hs = ctx.saved_tensors
        (a_dtype, b_dtype), s, none = ctx.dtypes, ctx.scaling, gy.new_empty(())
        g, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
        if a16.dim() == 2:
            gh = torch.addmm(none, g, b16, beta=0, alpha=s)  # scaling · g B: [n, rank]
            ga, gb = _mm(gh.t(), x2, a_dtype), _mm(g.t(), hs, b_dtype)
            gx = gh @ a16 if ctx.needs_input_grad[0] else None
        else:
            k = a16.shape[0]
            gk, xk = g.view(k, -1, g.shape[-1]), x2.view(k, -1, x2.shape[-1])
            gh = torch.baddbmm(none, gk, b16, beta=0, alpha=s)  # [K, n, rank]
            ga, gb = _mm(gh.transpose(1, 2), xk, a_dtype), _mm(gk.transpose(1, 2), hs, b_dtype)
            gx = torch.bmm(gh, a16).view(x2.shape) if ctx.needs_input_grad[0] else None
        if gx is not None:
            gx.addmm_(g, w)
            gx = gx.view(x.shape)
        return gx, None, None, ga, gb, None


# CUDA's matrix multiplies can write fp32 from bf16 operands (torch >= 2.8): the adapter's gradients then need
# no cast kernel after their GEMM.
_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.bmm, "dtype")


def _mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m1 @ m2 (2-D or batched) in `dtype`."""
    if m1.dtype == dtype:
        return m1 @ m2
    if m1.is_cuda and _OUT_DTYPE and dtype == torch.float32:
        return (torch.mm if m1.dim() == 2 else torch.bmm)(m1, m2, out_dtype=dtype)
    return (m1 @ m2).to(dtype)
