"""Putting LoRA on a model for a μA regime (peft + the paper's exact inits), or full finetuning."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from .theory import FULL, Regime, get_regime


def lora_config(regime: Regime, rank: int, alpha0: float, targets) -> LoraConfig:
    return LoraConfig(
        r=rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # overwritten by init_lora() below
        **regime.peft_args(alpha0, rank),
    )


@torch.no_grad()
def init_lora(model: torch.nn.Module, regime: Regime, rank: int, seed: int) -> int:
    """Init[A]: A ~ N(0, 1/n_in), B = 0.  Init[B]: A = 0, B ~ N(0, 1/r).  Both leave B A = 0.

    peft draws A Kaiming-uniform and has no Init[B]; the paper's normal inits are set here, before
    the optimizer exists. Returns the number of adapted layers.
    """
    g = torch.Generator(device="cpu").manual_seed(1_000 + seed)
    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, n_in), (n_out, r)
        if regime.init == "A":
            a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1]))
            b.zero_()
        else:
            a.zero_()
            b.copy_(torch.randn(b.shape, generator=g) / math.sqrt(rank))
        n += 1
    return n


def prepare(base: torch.nn.Module, regime_name: str, rank: int, alpha0: float, targets, seed: int):
    """A trainable copy of `base` for one trial; the base itself stays untouched."""
    import copy

    model = copy.deepcopy(base)
    if regime_name == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    regime = get_regime(regime_name)
    model = get_peft_model(model, lora_config(regime, rank, alpha0, targets))
    if init_lora(model, regime, rank, seed) == 0:
        raise RuntimeError("no LoRA layer was created")
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
