"""The largest LoRA rank a recipe's model can use, known before the model loads.

A rank past the smaller dimension min(n_in, n_out) of a layer spans no more than the layer's own weight, so a
rank above that of the widest adapted layer is meaningless. A sweep checks its ranks against it before anything
is stored and records it with the run, for `mua transfer --to RANK`. The model is built from its config on
PyTorch's meta device: shapes only, nothing pretrained or downloaded beyond the config. torch loads here, when
called, not when a sweep module is imported.
"""

from __future__ import annotations

from ..errors import MuaError
from ..spec.config import ModelSpec
from ..spec.recipe import Recipe


def rank_limit(recipe: Recipe) -> int | None:
    """The largest useful LoRA rank for the recipe's model and targets, checked against the recipe's ranks (a
    MuaError naming the rank above it); None where there are no LoRA ranks or the model's shape cannot be known
    before it loads (loading it then says why)."""
    if not recipe.lora_ranks:
        return None
    try:
        model = skeleton(recipe.model)
    except MuaError:
        raise
    except Exception:  # a config that does not load here fails again, with its message, where the model loads
        return None
    limit = layers_limit(model, recipe.model.targets, recipe.model.task)
    over = [r for r in recipe.lora_ranks if r > limit]
    if over:
        raise MuaError(
            f"rank {max(over)} is larger than the model's adapted layers allow: at most {limit}, the smaller "
            f"dimension min(n_in, n_out) of its widest adapted layer; lower --ranks"
        )
    return limit


def layers_limit(model, targets, task: str) -> int:
    """min(n_in, n_out) of the widest layer that LoRA adapts on `model` (peft's matching of `targets`, less a
    classifier's head)."""
    from .adapters import head_modules, lora_target_names

    modules = dict(model.named_modules())
    return max(min(_dims(modules[n])) for n in lora_target_names(model, targets, head_modules(model, task)))


def skeleton(m: ModelSpec):
    """The model with its layers' shapes and no weights, on the meta device."""
    import torch

    from .models import AUTO_CLASSES, embedded_config, local_or_hub, quiet_transformers

    if m.name.startswith("embedded:") and m.task == "seq-cls":  # the embedded encoder: its shape, two classes
        from transformers import RobertaConfig, RobertaForSequenceClassification

        from .encoder import CONFIG

        with torch.device("meta"):
            return RobertaForSequenceClassification(RobertaConfig(**CONFIG, num_labels=2))
    if m.name.startswith("embedded:"):
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(embedded_config(m))
    import transformers

    local_or_hub(m.name, "model")
    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(m.name, trust_remote_code=False)
    with torch.device("meta"):
        return getattr(transformers, AUTO_CLASSES[m.task]).from_config(config)


def _dims(module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx"):  # GPT-2's transposed linear
        return int(module.nx), int(module.nf)
    return int(module.in_features), int(module.out_features)
