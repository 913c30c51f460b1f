"""mua's LoRA layers on a GPU: autograd functions for one adapted layer (LoraLinearFn) and for siblings that
read one input (GroupedLora), the adapters' weights cast once per forward (precast_adapters), and the state
mua keeps on each layer for them (LayerState). lora_addmm.py decides which layers take them; docs/performance.md
has what each piece saved on an H200.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

STATE = "mua_state"  # the key of a layer's LayerState in its __dict__


@dataclass(frozen=True)
class Cast:
    """A layer's A and B cast to the step's dtype by precast_adapters' pre-hook: valid while `a` and `b` are
    still the layer's weights and their versions are still `versions` (unchanged since the copy)."""

    a: torch.Tensor  # the layer's A and B when the copy was made
    b: torch.Tensor
    a16: torch.Tensor  # their casts: views of the cast buffer
    b16: torch.Tensor
    versions: tuple[int, int]  # (a._version, b._version) when the copy was made


@dataclass(frozen=True)
class Pending:
    """A grouped layer's output computed by a sibling's call (GroupedLora computes the whole group): the
    layer's next call returns it if that call is given the same tensor `x`, unchanged since (`version`)."""

    x: torch.Tensor
    version: int
    out: torch.Tensor


@dataclass
class LayerState:
    """What mua keeps on one folded peft LoRA layer (lora_addmm.fold_lora_adds, precast_adapters). Held in the
    layer's __dict__ under STATE, not set as a module attribute: the group's sibling modules and the tensors
    here must not join the layer's submodules, parameters or buffers (state_dict, .to(), named_modules)."""

    whole_layer: bool = False  # may run as LoraLinearFn / GroupedLora (mua's choice on a GPU)
    # the layers that read this one's input (lora_addmm.GROUPS, itself included): one list shared by all of them
    group: list[LoraLinear] = field(default_factory=list)
    cast: Cast | None = None  # A and B cast, set by precast_adapters' pre-hook at every forward
    pending: Pending | None = None  # this layer's output computed by a sibling, taken by its next call
    group_a16: torch.Tensor | None = None  # the group's A matrices concatenated and cast: a view of the cast buffer
    w_ext: torch.Tensor | None = None  # [W | B] of a grouped layer (_extended_weights)


def state_of(module: torch.nn.Module) -> LayerState | None:
    """The layer's LayerState, or None where fold_lora_adds did not fold it."""
    return module.__dict__.get(STATE)


def ensure_state(module: torch.nn.Module) -> LayerState:
    """The layer's LayerState, made empty on first use."""
    state = module.__dict__.get(STATE)
    if state is None:
        state = module.__dict__[STATE] = LayerState()
    return state


def precast_adapters(model: torch.nn.Module) -> int:
    """On a GPU, after fold_lora_adds(whole_layer=True): the adapters' fp32 weights are moved into one flat
    buffer (each parameter a view of it, the same objects) with a bf16 twin, copied from it by one kernel at
    the start of every forward of `model` (a pre-hook, so inside a captured step too). Why: casting each A and
    B where it is used was 2 kernels per adapted layer, each with its launch gap.
    A group's A matrices (lora_addmm.GROUPS) sit next to each other, so their concatenation is a view too,
    and its layers get [W | B] matrices (_extended_weights) whose B columns the same pre-hook refreshes. A
    layer uses the casts only while its weights are unchanged since the copy (versions), else casts them
    itself. Returns how many layers take part."""
    layers = []
    for m in model.modules():
        w = getattr(getattr(m, "base_layer", None), "weight", None)
        if (
            type(m) is LoraLinear
            and (state := state_of(m)) is not None
            and state.whole_layer
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
        full = state_of(m).group
        group = [g for g in full if id(g) in included]
        if len(group) < 2 or group != full or m.lora_A[name].weight.dim() != 2:
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
            state_of(g).group_a16 = flat16[start : start + rows * a0.shape[1]].view(rows, a0.shape[1])
    extended, to, frm = _extended_weights([g for group, _ in groups for g in group], offsets)
    layer_ab = [(state_of(m), m.lora_A[name].weight, m.lora_B[name].weight) for m, name, _ in layers]

    def refresh(_module, _args) -> None:
        flat16.copy_(flat)
        if extended is not None:
            extended[to] = flat16[frm]  # each grouped B into its columns of its layer's [W | B]
        for state, a, b in layer_ab:
            state.cast = Cast(a, b, views[id(a)], views[id(b)], (a._version, b._version))

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
    groups = [state_of(m).group for m in members]  # the list each member shares with its siblings
    totals: dict[int, int] = {}  # each group's summed ranks
    for group, (a, _) in zip(groups, ab, strict=True):
        totals[id(group)] = totals.get(id(group), 0) + a.shape[0]
    size = sum(
        m.base_layer.weight.shape[0] * (m.base_layer.weight.shape[1] + totals[id(group)])
        for m, group in zip(members, groups, strict=True)
    )
    extended = torch.zeros(size, dtype=w0.dtype, device=w0.device)
    to, frm, off, col = [], [], 0, {}
    for m, group, (a, b) in zip(members, groups, ab, strict=True):
        (out, n_in), r = m.base_layer.weight.shape, a.shape[0]
        k = n_in + totals[id(group)]
        first = col.get(id(group), n_in)
        ext = extended[off : off + out * k].view(out, k)
        ext[:, :n_in].copy_(m.base_layer.weight)
        rows = torch.arange(out, device=w0.device).view(-1, 1)
        to.append((off + rows * k + first + torch.arange(r, device=w0.device)).view(-1))
        frm.append(offsets[id(b)] + torch.arange(out * r, device=w0.device))
        state_of(m).w_ext = ext
        col[id(group)], off = first + r, off + out * k
    return extended, torch.cat(to), torch.cat(frm)


class LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + bias + scaling · (x Aᵀ) Bᵀ over a frozen W in x's dtype; A and B ([rank, in] and [out, rank],
    or [K, ·, ·] for K batched trials whose rows are grouped by trial, train/stacked.py) in any float dtype: cast
    here, and their gradients come back in it.

    The order of the GEMMs is the point. Each of the adapter's whole-width products (its output, its input
    gradient) is written first, by a GEMM whose inner dimension is the rank, and the base's GEMM then adds
    into it (beta = 1): the base's GEMM is bound by arithmetic, so one more operand read in its epilogue costs
    little, whereas a rank-r GEMM adding into the base's output must read and write all
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


class GroupedLora(torch.autograd.Function):
    """LoraLinearFn for m layers that read the same input x (one trial, 2-D adapters, one scaling): their A
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
            if all(e is not None for e in ext):  # each output one GEMM by [W | B]
                xh = torch.cat([x2, hs], dim=1)
                for e, bias in zip(ext, biases, strict=True):
                    y = torch.mm(xh, e.t()) if bias is None else torch.addmm(bias, xh, e.t())
                    outs.append(y.view(*x.shape[:-1], -1))
            else:  # the adapter's product written, the base's GEMM adding into it
                for w, bias, b, c in zip(ws, biases, b16, cols, strict=True):
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
        # each scaling · g B written whole and then concatenated: written into rows of one buffer instead, the
        # GEMMs ran slower (strided output)
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
    """Each adapter's columns among the concatenated ranks."""
    ends = list(itertools.accumulate(a.shape[0] for a in as_))
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
