"""LoRA's scale-and-add folded into its second matrix multiply: `addmm(base_out, h, Bᵀ, alpha=scaling)` in place
of peft's `base_out + lora_B(h) * scaling`.

Why: peft's form makes two more passes over the layer's whole output in the forward (the scale, then the add)
and one in the backward (the scale's gradient), per adapted layer; a GEMM with alpha and beta does both in its
epilogue, and its backward scales only the small [tokens, rank] and [rank, out] gradients. The arithmetic is
the same up to rounding (one rounding instead of three); tests/test_lora_addmm.py checks outputs and
gradients against peft's for serial and batched adapters.

`whole_layer` (mua's choice on a GPU) goes further for a LoRA layer over a frozen nn.Linear: base and adapter
in one autograd function (`_LoraLinear`) that orders its GEMMs so the base's adds into the adapter's product,
and adds the adapter's input gradient inside the base's backward GEMM instead of autograd adding two whole
input gradients; siblings that read one input (GROUPS) run as one function (`_GroupedLora`) with their A
matrices concatenated; `precast_adapters` casts every adapter with one kernel per forward. Measured on an
H200 (365M, one trial; docs/performance.md): the graphed step went 51.1 → 47.9 → 39.4 ms through these and
the norm and attention changes documented there.

Only plain LoRA layers take this path (peft's Linear with one active adapter, no dropout, no variant such as
DoRA, not merged); anything else runs peft's own forward.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

# Sibling layers that read the same input (q/k/v; the MLP's gate and up): on a GPU their adapters run as one
# (_GroupedLora), so that input is read once by LoRA's A matrices and their input gradients are summed inside
# the GEMMs instead of by autograd.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fold_lora_adds(model: torch.nn.Module, whole_layer: bool = False) -> int:
    """Gives every plain LoRA linear layer of `model` the folded forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # subclasses (quantized, variants) keep peft's forward
            module.forward = types.MethodType(_forward, module)
            module.mua_whole_layer = whole_layer
            n += 1
        if whole_layer:
            for names in GROUPS:
                group = [getattr(module, name, None) for name in names]
                if all(type(m) is LoraLinear for m in group):
                    for m in group:
                        m.mua_group = group  # a list: not registered as submodules
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
    """(W, bias, A, B, scaling) where the layer can run as _LoraLinear: a frozen nn.Linear base in the
    step's dtype, on a GPU (mua_whole_layer)."""
    if name is None or not getattr(self, "mua_whole_layer", False):
        return None
    base = self.base_layer
    if type(base) is not torch.nn.Linear or any(p.requires_grad for p in base.parameters()):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if base.weight.dtype != dtype:
        return None
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    a16 = b16 = None
    cast = self.__dict__.get("mua_cast")  # (a, b, a16, b16, versions) from precast_adapters
    if cast is not None and cast[0] is a and cast[1] is b and cast[4] == (a._version, b._version):
        a16, b16 = cast[2], cast[3]
    return base.weight, base.bias, a, b, self.scaling[name], a16, b16


def _forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    pending = self.__dict__.pop("mua_pending", None)  # computed by a sibling's call on this same input
    if pending is not None and pending[0] is x and pending[1] == x._version and not (args or kwargs):
        return pending[2]
    name = _adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    whole = _whole(self, name, x)
    if whole is not None:
        dtype = whole[0].dtype
        group = self.__dict__.get("mua_group", ())
        parts = [whole if m is self else _whole(m, _adapter(m, x), x) for m in group]
        if parts and whole[2].dim() == 2 and all(p is not None and p[4] == whole[4] for p in parts):
            ts = [t for k in (0, 1, 2, 3, 6) for t in (p[k] for p in parts)]  # Ws, biases, As, Bs, cast Bs
            a16 = self.__dict__.get("mua_group_a16") if all(p[5] is not None for p in parts) else None
            ts += [m.__dict__.get("mua_w_ext") if a16 is not None else None for m in group]
            outs = _GroupedLora.apply(x.to(dtype), whole[4], len(group), a16, *ts)
            for m, out in zip(group, outs, strict=True):
                if m is not self:
                    m.mua_pending = (x, x._version, out)
            return outs[group.index(self)]
        return _LoraLinear.apply(x.to(dtype), *whole)
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    frozen_linear = type(base) is torch.nn.Linear and not any(p.requires_grad for p in base.parameters())
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


def precast_adapters(model: torch.nn.Module) -> int:
    """On a GPU, after fold_lora_adds(whole_layer=True): the adapters' fp32 weights are moved into one flat
    buffer (each parameter a view of it, the same objects) with a bf16 twin, copied from it by one kernel at
    the start of every forward of `model` (a pre-hook, so inside a captured step too). Why: casting each A and
    B where it is used was 2 kernels per adapted layer, 336 per 365M step, each ~1.5 µs plus its launch gap.
    A group's A matrices (GROUPS) sit next to each other, so their concatenation is a view too. A layer uses
    its cast views only while its weights are unchanged since the copy (versions), else casts them itself.
    Returns how many layers take part."""
    layers = []
    for m in model.modules():
        w = getattr(getattr(m, "base_layer", None), "weight", None)
        if (
            type(m) is LoraLinear
            and getattr(m, "mua_whole_layer", False)
            and w is not None
            and len(m.active_adapters) == 1
        ):
            name = m.active_adapters[0]
            if name in m.lora_A and w.dtype in (torch.bfloat16, torch.float16):
                layers.append((m, name, w.dtype))
    if not layers:
        return 0
    placed, params, group_spans = set(), [], []
    included = {id(m) for m, _, _ in layers}
    for m, name, _ in layers:
        if id(m) in placed:
            continue
        group = [g for g in m.__dict__.get("mua_group", ()) if id(g) in included]
        if len(group) < 2 or group != m.__dict__.get("mua_group") or m.lora_A[name].weight.dim() != 2:
            group = [m]
        start = sum(p.numel() for p in params)
        params += [g.lora_A[g.active_adapters[0]].weight for g in group]
        group_spans.append((group, start))
        params += [g.lora_B[g.active_adapters[0]].weight for g in group]
        placed.update(id(g) for g in group)
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params) or len({dt for *_, dt in layers}) != 1:
        return 0
    flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    flat16 = torch.empty_like(flat, dtype=layers[0][2])
    views, offsets, off = {}, {}, 0
    for p in params:
        n = p.numel()
        flat[off : off + n].view_as(p).copy_(p.data)
        p.data = flat[off : off + n].view_as(p)
        views[id(p)], offsets[id(p)] = flat16[off : off + n].view_as(p), off
        off += n
    groups = [(group, start) for group, start in group_spans if len(group) > 1]
    for group, start in groups:
        a0 = group[0].lora_A[group[0].active_adapters[0]].weight
        rows = sum(g.lora_A[g.active_adapters[0]].weight.shape[0] for g in group)
        for g in group:
            g.mua_group_a16 = flat16[start : start + rows * a0.shape[1]].view(rows, a0.shape[1])
    extended, to, frm = _extended_weights([g for group, _ in groups for g in group], offsets)
    layer_ab = [(m, m.lora_A[name].weight, m.lora_B[name].weight) for m, name, _ in layers]

    def refresh(_module, _args) -> None:
        flat16.copy_(flat)
        if extended is not None:
            extended[to] = flat16[frm]  # each grouped B into its columns of its layer's [W | B]
        for m, a, b in layer_ab:
            m.mua_cast = (a, b, views[id(a)], views[id(b)], (a._version, b._version))

    model.register_forward_pre_hook(refresh)
    return len(layers)


def _extended_weights(members: list[LoraLinear], offsets: dict[int, int]):
    """For the members of groups (in group order): [W | 0 .. B .. 0], [out, in + Σ ranks] in the step's dtype,
    W copied once (it is frozen), B's columns at the member's place among the group's concatenated ranks, so
    that x Wᵀ + (scaling · x Aᵀ) Bᵀ is one GEMM of [x | scaling · x A_allᵀ] by it: the base's GEMM with a
    few more columns of K instead of a rank-r GEMM writing the whole output and the base's adding into it.
    Returns the flat buffer, and the indices into it and into the cast twin that the refresh copies B by."""
    if not members:
        return None, None, None
    ab = [(m.lora_A[m.active_adapters[0]].weight, m.lora_B[m.active_adapters[0]].weight) for m in members]
    w0 = members[0].base_layer.weight
    totals: dict[int, int] = {}  # each group's summed ranks
    for m, (a, _) in zip(members, ab, strict=True):
        totals[id(m.mua_group)] = totals.get(id(m.mua_group), 0) + a.shape[0]
    size = sum(m.base_layer.weight.shape[0] * (m.base_layer.weight.shape[1] + totals[id(m.mua_group)]) for m in members)
    extended = torch.zeros(size, dtype=w0.dtype, device=w0.device)
    to, frm, off, col = [], [], 0, {}
    for m, (a, b) in zip(members, ab, strict=True):
        group, (out, n_in), r = m.mua_group, m.base_layer.weight.shape, a.shape[0]
        k = n_in + totals[id(group)]
        first = col.get(id(group), n_in)
        ext = extended[off : off + out * k].view(out, k)
        ext[:, :n_in].copy_(m.base_layer.weight)
        rows = torch.arange(out, device=w0.device).view(-1, 1)
        to.append((off + rows * k + first + torch.arange(r, device=w0.device)).view(-1))
        frm.append(offsets[id(b)] + torch.arange(out * r, device=w0.device))
        m.mua_w_ext = ext
        col[id(group)], off = first + r, off + out * k
    return extended, torch.cat(to), torch.cat(frm)


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
    def forward(ctx, x, w, bias, a, b, scaling, a16=None, b16=None):
        dt, none = x.dtype, x.new_empty(())  # `none`: an addmm input that beta = 0 ignores
        with torch.autocast(x.device.type, enabled=False):
            a16 = a.to(dt) if a16 is None else a16  # cast already where precast_adapters did it
            b16 = b.to(dt) if b16 is None else b16
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
        return gx, None, None, ga, gb, None, None, None


class _GroupedLora(torch.autograd.Function):
    """_LoraLinear for m layers that read the same input x (one trial, 2-D adapters, one scaling): their A
    matrices concatenated, so x is read once in the forward (x Aᵀ) and once in the backward (A's gradient), and
    the input gradient is the concatenated adapters' product plus each base's GEMM added into it (beta = 1)
    instead of m whole gradients summed by autograd. With the weights extended by precast_adapters, each
    output is one GEMM of [x | scaling · x Aᵀ] by [W | B] (_extended_weights). apply(x, scaling, m,
    [A₁; ..; Aₘ] cast or None, W₁..Wₘ, bias₁..biasₘ, A₁..Aₘ, B₁..Bₘ, B₁..Bₘ cast or None, [Wᵢ | Bᵢ] or None)
    returns the m outputs."""

    @staticmethod
    def forward(ctx, x, scaling, m, a16, *ts):
        ws, biases, as_, bs, b16, ext = (ts[i * m : (i + 1) * m] for i in range(6))
        dt, none = x.dtype, x.new_empty(())
        with torch.autocast(x.device.type, enabled=False):
            a16 = torch.cat(as_).to(dt) if a16 is None else a16
            b16 = [b.to(dt) if c is None else c for b, c in zip(bs, b16, strict=True)]
            x2 = x.reshape(-1, x.shape[-1])
            hs = torch.addmm(none, x2, a16.t(), beta=0, alpha=scaling)  # [n, Σ ranks]
            outs, cols = [], _columns(as_)
            if all(e is not None for e in ext):
                xh = torch.cat([x2, hs], dim=1)
                for e, bias in zip(ext, biases, strict=True):
                    y = torch.mm(xh, e.t()) if bias is None else torch.addmm(bias, xh, e.t())
                    outs.append(y.view(*x.shape[:-1], -1))
            for w, bias, b, c in zip(ws, biases, b16, cols, strict=True) if not outs else ():
                y = torch.mm(hs[:, c], b.t()) if bias is None else torch.addmm(bias, hs[:, c], b.t())
                outs.append(y.addmm_(x2, w.t()).view(*x.shape[:-1], -1))
        ctx.save_for_backward(x, a16, hs, *ws, *b16)
        ctx.scaling, ctx.m, ctx.cols, ctx.dtypes = scaling, m, cols, (as_[0].dtype, bs[0].dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gys):
        x, a16, hs, *rest = ctx.saved_tensors
        m, s, (a_dtype, b_dtype) = ctx.m, ctx.scaling, ctx.dtypes
        ws, b16 = rest[:m], rest[m:]
        x2 = x.reshape(-1, x.shape[-1])
        gs = [gy.reshape(-1, gy.shape[-1]) for gy in gys]
        none = x2.new_empty(())
        # each scaling · g B written whole and then concatenated: written into rows of one [Σ ranks, n] buffer
        # instead, their GEMMs ran 12.8 µs against 7.0 (H200, 365M)
        gh = torch.cat([torch.addmm(none, g, b, beta=0, alpha=s) for g, b in zip(gs, b16, strict=True)], dim=1)
        gb = [_mm(g.t(), hs[:, c], b_dtype) for g, c in zip(gs, ctx.cols, strict=True)]
        ga = _mm(gh.t(), x2, a_dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gh @ a16
            for g, w in zip(gs, ws, strict=True):
                gx.addmm_(g, w)
            gx = gx.view(x.shape)
        return gx, None, None, None, *[None] * (2 * m), *[ga[c] for c in ctx.cols], *gb, *[None] * (2 * m)


def _columns(as_) -> list[slice]:
    ends = torch.tensor([a.shape[0] for a in as_]).cumsum(0).tolist()
    return [slice(e - a.shape[0], e) for a, e in zip(as_, ends, strict=True)]


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
