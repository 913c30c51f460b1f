"""Putting LoRA on a model for a μA regime (peft + the paper's exact inits), or full finetuning; the
optimizer's parameter groups (a new classification head at its own fixed LR, per-layer fan-in scaling)."""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from ..errors import MuaError
from ..science.theory import FULL, Regime, get_regime

ALL_LINEAR = "all-linear"


def normalize_targets(targets) -> str | list[str]:
    """'all-linear', a list of module names, or 'q_proj,v_proj' (the command line's form) → peft's form."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [t for t in names if t]
    if not names:
        raise MuaError("no LoRA target module given; use all-linear or names such as q_proj,v_proj")
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def lora_config(
    regime: Regime, rank: int, alpha0: float, targets, head: tuple[str, ...] | list[str] = ()
) -> LoraConfig:
    """peft's config for one regime and rank. A classification `head` (top-level module names) is kept out of
    LoRA and trained in full (peft's modules_to_save)."""
    extra: dict = {}
    if head:
        extra["modules_to_save"] = list(head)
        extra["exclude_modules"] = _head_regex(head)
    return LoraConfig(
        r=rank,
        target_modules=normalize_targets(targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # overwritten by init_lora() below
        **regime.peft_args(alpha0, rank),
        **extra,
    )


def _head_regex(head) -> str:
    return r"^(.*\.)?(" + "|".join(re.escape(h) for h in head) + r")(\..*)?$"


@torch.no_grad()
def init_lora(model: torch.nn.Module, regime: Regime, rank: int | None, seed: int, adapter: str = "default") -> int:
    """Init[A]: A ~ N(0, 1/n_in), B = 0.  Init[B]: A = 0, B ~ N(0, 1/r).  Both leave B A = 0.

    peft draws A Kaiming-uniform and has no Init[B]; the paper's normal inits are set here, before
    the optimizer exists. `rank` None: each layer's own. The draws come from one CPU generator seeded by
    `seed`, layer by layer in module order, so the same seed on the same model gives the same tensors (this is
    also `mua_cli.api.apply_regime`). Returns the number of adapted layers.
    """
    n = 0
    for module, a, b in lora_draws(model, regime, rank, seed, adapter):
        module.lora_A[adapter].weight.copy_(a)
        module.lora_B[adapter].weight.copy_(b)
        n += 1
    return n


def lora_draws(model: torch.nn.Module, regime: Regime, rank: int | None, seed: int, adapter: str = "default"):
    """(layer, A, B) for each adapted layer in module order: the values init_lora sets. A layer whose adapters
    were stacked for K trials (stacked.py, weights [K, out, in]) gets the one trial's shapes, so that copying
    them in gives every trial the init a trial alone would have."""
    g = torch.Generator(device="cpu").manual_seed(1_000 + seed)
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        a_shape = module.lora_A[adapter].weight.shape[-2:]  # (r, n_in)
        b_shape = module.lora_B[adapter].weight.shape[-2:]  # (n_out, r)
        if regime.init == "A":
            yield module, torch.randn(a_shape, generator=g) / math.sqrt(a_shape[1]), torch.zeros(b_shape)
        else:
            yield module, torch.zeros(a_shape), torch.randn(b_shape, generator=g) / math.sqrt(rank or a_shape[0])


def regime_scaling_errors(model: torch.nn.Module, regime: Regime, alpha0: float, adapter: str = "default") -> list:
    """The adapted layers whose peft scaling (lora_alpha / r, or / sqrt(r) with use_rslora) is not the regime's
    α at their rank: (layer name, rank, its scaling, the regime's α)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            r, have = int(module.r[adapter]), float(module.scaling[adapter])
            want = regime.alpha(alpha0, r)
            if not math.isclose(have, want, rel_tol=1e-6):
                out.append((name, r, have, want))
    return out


def head_modules(model: torch.nn.Module, task: str) -> list[str]:
    """A classifier's task head: its top-level modules with parameters other than the pretrained body
    (`classifier` for BERT/RoBERTa/ViT, `score` for Llama/GPT-2). Causal LMs have none (lm_head is pretrained)."""
    if task == "causal-lm":
        return []
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return [
        name for name, child in model.named_children() if child is not body and any(True for _ in child.parameters())
    ]


def prepare(
    base: torch.nn.Module,
    regime_name: str,
    rank: int,
    alpha0: float,
    targets,
    seed: int,
    head: tuple[str, ...] | list[str] = (),
):
    """A trainable copy of `base` for one trial; the base itself stays untouched.

    Trainable parameters are float32 (master weights) whatever the base's dtype; a bf16 base runs under autocast.
    """
    model = copy.deepcopy(base)
    if regime_name == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        regime = get_regime(regime_name)
        with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            model = get_peft_model(model, lora_config(regime, rank, alpha0, targets, head))
        if init_lora(model, regime, rank, seed) == 0:
            raise RuntimeError("no LoRA layer was created")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def lora_target_names(base: torch.nn.Module, targets, head=()) -> list[str]:
    """The module names LoRA will adapt (peft's matching: all-linear less the output layer, or names matched
    as suffixes), less the head; a clear error when that is nothing."""
    t = normalize_targets(targets)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    rx = re.compile(_head_regex(head)) if head else None
    names = []
    for name, module in base.named_modules():
        if not name or not _is_linear(module) or (rx and rx.match(name)):
            continue
        if t == ALL_LINEAR:
            if module is not out_emb:
                names.append(name)
        elif any(name == k or name.endswith("." + k) for k in t):
            names.append(name)
    if not names:
        some = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if n and _is_linear(m)})
        raise MuaError(
            f"LoRA targets {targets!r} match no linear layer of the model; its linear layers are named "
            f"{', '.join(some[:12]) or '(none)'} (or use all-linear)"
        )
    return names


# ------------------------------------------------------------------------------------------ parameter groups


@dataclass
class GroupInfo:
    name: str
    lr: float
    n_params: int
    scale: float | None = None  # the per-layer factor on the trial's LR; None for the head's fixed LR


@dataclass
class Groups:
    groups: list[dict]  # torch optimizer parameter groups ({"params": [...], "lr": ...})
    info: list[GroupInfo] = field(default_factory=list)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def _strip_peft(name: str) -> str:
    return name[len("base_model.model.") :] if name.startswith("base_model.model.") else name


def _fan_in(module: torch.nn.Module) -> int | None:
    if isinstance(module, LoraLayer):
        return int(module.in_features)
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx"):  # GPT-2's transposed linear
        return int(module.nx)
    return None


def param_groups(
    model: torch.nn.Module,
    regime_name: str,
    lr: float,
    head: tuple[str, ...] | list[str] = (),
    head_lr: float = 1e-3,
    per_layer: bool = False,
    base_n: int | None = None,
) -> Groups:
    """The optimizer's parameter groups for one trial.

    - A classification head (top-level modules `head`) trains in full at the fixed `head_lr`, in LoRA and
      full-finetuning trials alike; everything else trains at the trial's `lr`.
    - `per_layer`: the fan-in rule of docs/science.md with base_n = the model's width: a layer with fan-in n_in gets
      lr · base_n/n_in (Init[B] LoRA and full finetuning) or lr · sqrt(base_n/n_in) (Init[A] LoRA); LoRA's A
      and B of a layer share its factor. In full finetuning only the weight matrices of linear layers are
      scaled; embeddings, norms and biases keep the trial's LR.
    Without a head and per-layer scaling this is one group of every trainable parameter, in model order.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_ids: set[int] = set()
    if head:
        for name, module in model.named_modules():
            if _strip_peft(name) in head:
                head_ids.update(id(p) for p in module.parameters() if p.requires_grad)
    scale: dict[int, float] = {}
    if per_layer:
        if not base_n:
            raise MuaError("--per-layer-lr needs the model's hidden size (base_n); its config has none")
        power = 1.0 if regime_name == FULL or get_regime(regime_name).init == "B" else 0.5
        for module in model.modules():
            n_in = _fan_in(module)
            if n_in is None:
                continue
            if isinstance(module, LoraLayer):
                owned = [p for d in (module.lora_A, module.lora_B) for m in d.values() for p in m.parameters()]
            elif regime_name == FULL:
                owned = [module.weight]
            else:
                continue
            for p in owned:
                if p.requires_grad and id(p) not in head_ids:
                    scale.setdefault(id(p), (base_n / n_in) ** power)
    buckets: dict[tuple, list] = {}
    for _, p in trainable:
        key = ("head",) if id(p) in head_ids else ("body", scale.get(id(p), 1.0))
        buckets.setdefault(key, []).append(p)
    out = Groups(groups=[])
    if list(buckets) == [("body", 1.0)]:
        params = buckets[("body", 1.0)]
        out.groups.append({"params": params})  # the trial's LR, exactly as a plain optimizer over all of them
        out.info.append(GroupInfo("all trainable", lr, sum(p.numel() for p in params), 1.0))
        return out
    for key in sorted(buckets, key=lambda k: (k[0] == "head", -k[1] if len(k) > 1 else 0)):
        params = buckets[key]
        n = sum(p.numel() for p in params)
        if key[0] == "head":
            out.groups.append({"params": params, "lr": head_lr})
            out.info.append(GroupInfo(f"head ({', '.join(head)})", head_lr, n, None))
        else:
            s = key[1]
            out.groups.append({"params": params, "lr": lr * s})
            label = "body" if not per_layer else f"fan-in scale {s:.4g}"
            out.info.append(GroupInfo(label, lr * s, n, s))
    return out
