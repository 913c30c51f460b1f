"""LoRA's scale-and-add folded into its second matrix multiply: `addmm(base_out, h, Bᵀ, alpha=scaling)` in place
of peft's `base_out + lora_B(h) * scaling`.

Why: peft's form makes two more passes over the layer's whole output in the forward (the scale, then the add)
and one in the backward (the scale's gradient), per adapted layer; a GEMM with alpha and beta does both in its
epilogue, and its backward scales only the small [tokens, rank] and [rank, out] gradients. The arithmetic is
the same up to rounding (one rounding instead of three); tests/test_lora_addmm.py checks outputs and
gradients against peft's for serial and batched adapters.

`whole_layer` (mua's choice on a GPU) goes further for a LoRA layer over a frozen nn.Linear: base and adapter
in one autograd function (lora_gpu.py's `LoraLinearFn`) that orders its GEMMs so the base's adds into the
adapter's product, and adds the adapter's input gradient inside the base's backward GEMM instead of autograd
adding two whole input gradients; siblings that read one input (GROUPS) run as one function (`GroupedLora`)
with their A matrices concatenated; `precast_adapters` casts every adapter with one kernel per forward
(what each step bought: docs/performance.md).

Only plain LoRA layers take this path (peft's Linear with one active adapter, no dropout, no variant such as
DoRA, not merged); anything else runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from .lora_gpu import GroupedLora, LoraLinearFn, Pending, ensure_state, state_of

# Sibling layers that read the same input (q/k/v; the MLP's gate and up): on a GPU their adapters run as one
# (lora_gpu.GroupedLora), so that input is read once by LoRA's A matrices and their input gradients are summed
# inside the GEMMs instead of by autograd.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fold_lora_adds(model: torch.nn.Module, whole_layer: bool = False) -> int:
    """Gives every plain LoRA linear layer of `model` the folded forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # subclasses (quantized, variants) keep peft's forward
            module.forward = types.MethodType(_forward, module)
            ensure_state(module).whole_layer = whole_layer
            n += 1
        if whole_layer:
            for names in GROUPS:
                group = [getattr(module, name, None) for name in names]
                if all(type(m) is LoraLinear for m in group):
                    for m in group:
                        ensure_state(m).group = group  # the same list for each
    return n


def _adapter(self: LoraLinear, x: torch.Tensor, args=(), kwargs=None) -> str | None:
    """The one plain adapter this call can fold (no dropout, no variant such as DoRA, not merged), or None."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (
        name is not None
        and not (args or kwargs or self.disable_adapters or self.merged)
        and name in self.lora_A
        and name not in self.lora_variant
        and isinstance(self.lora_dropout[name], torch.nn.Identity)
    )
    if plain and not torch.is_autocast_enabled(x.device.type):  # addmm needs base and adapter in one dtype
        plain = getattr(getattr(self.base_layer, "weight", None), "dtype", None) == self.lora_B[name].weight.dtype
    return name if plain else None


def _whole(self: LoraLinear, name: str | None, x: torch.Tensor) -> tuple | None:
    """(W, bias, A, B, scaling, A cast, B cast) where the layer can run as LoraLinearFn: a frozen nn.Linear
    base in the step's dtype, on a GPU (LayerState.whole_layer). The casts are precast_adapters' while A and B are
    unchanged since it made them, else None."""
    state = state_of(self)
    if name is None or state is None or not state.whole_layer:
        return None
    base = self.base_layer
    if type(base) is not torch.nn.Linear or any(p.requires_grad for p in base.parameters()):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if base.weight.dtype != dtype:
        return None
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    a16 = b16 = None
    cast = state.cast  # from lora_gpu.precast_adapters
    if cast is not None and cast.a is a and cast.b is b and cast.versions == (a._version, b._version):
        a16, b16 = cast.a16, cast.b16
    return base.weight, base.bias, a, b, self.scaling[name], a16, b16


def _forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    state = ensure_state(self)  # made by fold_lora_adds, which gave the layer this forward
    pending, state.pending = state.pending, None  # computed by a sibling's call on this same input
    if pending is not None and pending.x is x and pending.version == x._version and not (args or kwargs):
        return pending.out
    name = _adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    whole = _whole(self, name, x)
    if whole is not None:
        dtype = whole[0].dtype
        group = state.group
        parts = [whole if m is self else _whole(m, _adapter(m, x), x) for m in group]
        if parts and whole[2].dim() == 2 and all(p is not None and p[4] == whole[4] for p in parts):
            ts = [t for k in (0, 1, 2, 3, 6) for t in (p[k] for p in parts)]  # Ws, biases, As, Bs, cast Bs
            a16 = state.group_a16 if all(p[5] is not None for p in parts) else None
            ts += [state_of(m).w_ext if a16 is not None else None for m in group]
            outs = GroupedLora.apply(x.to(dtype), whole[4], len(group), a16, *ts)
            for m, out in zip(group, outs, strict=True):
                if m is not self:
                    state_of(m).pending = Pending(x, x._version, out)
            return outs[group.index(self)]
        return LoraLinearFn.apply(x.to(dtype), *whole)
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    frozen_linear = type(base) is torch.nn.Linear and not any(p.requires_grad for p in base.parameters())
    if frozen_linear and b.dim() == 2:
        # the output made 2-D and added into in place: not a view of a 3-D one, so autograd records no CopySlices,
        # whose backward copies the layer's whole output gradient once more
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.nn.functional.linear(x2, base.weight, base.bias)
        h = self.lora_A[name](self._cast_input_dtype(x2, a.dtype))
        out.addmm_(h, b.to(out.dtype).t(), alpha=self.scaling[name])  # under autocast: addmm_ is not autocast's
        return out.view(*x.shape[:-1], out.shape[-1])
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
