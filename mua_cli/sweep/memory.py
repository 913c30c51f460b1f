"""How much GPU memory a trial needs, and the plan that follows: slots per GPU and LoRA trials per pass.

The estimate counts what a training step keeps alive, per unit of work (one trial, or K batched LoRA trials):
the trial's own copy of the frozen base, the trainable weights with their gradients and AdamW moments, the
activations saved for the backward (which a captured step keeps in its graph's pool), and a causal LM's logits
(vocabulary × tokens, in bf16 and again in fp32 with their gradients: the term that makes a large vocabulary
expensive). It is deliberately rough and on the high side; what it gets wrong, the runner's OOM handling
catches (runner.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..spec.recipe import Recipe
from ..train.adapters import head_modules, lora_target_names

GIB = 2**30
HEADROOM = 0.9  # of the GPU's memory (or of a per-process cap): the CUDA context, kernels' workspaces, fragmentation
SLACK = 1.25  # on activations and logits: the allocator's rounding and the temporaries of a step
ADAM_BYTES = 4 + 4 + 8  # a trainable fp32 weight, its gradient and AdamW's two moments
LOGIT_BYTES = 2 + 4 + 4 + 2  # per vocabulary entry and token: bf16 logits, their fp32 copy, both gradients


@dataclass
class TrialMemory:
    """Bytes: `fixed` per unit whatever its K (the trial's copy of the base), `per_trial` for each batched trial."""

    base: int  # the slot's frozen base, loaded once
    fixed: int
    per_trial: int
    parts: dict

    def unit(self, k: int) -> int:
        return self.fixed + k * self.per_trial

    def describe(self, k: int = 1) -> str:
        parts = ", ".join(f"{name} {v / GIB:.2f}" for name, v in self.parts.items())
        return f"{self.unit(k) / GIB:.1f} GiB for {k} trial(s) ({parts} GiB per trial)"


def tokens_per_example(task, model: torch.nn.Module, recipe: Recipe) -> int:
    """The sequence length a training example runs at: an LM window, a classifier's padded width, or an
    image's patches (and its class token)."""
    if task.kind == "causal-lm":
        return recipe.data.seq_len
    if task.kind == "seq-cls":
        return int(task.input_ids.shape[1])
    cfg = model.config
    size, patch = int(getattr(cfg, "image_size", 224) or 224), int(getattr(cfg, "patch_size", 16) or 16)
    return (size // patch) ** 2 + 1


def _shape(model: torch.nn.Module) -> tuple[int, int, int, int, int]:
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 1)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    return hidden, inter, layers, heads, vocab


def estimate(base: torch.nn.Module, task, recipe: Recipe, rank: int | None) -> TrialMemory:
    """One trial's memory on a GPU; `rank` None for full finetuning. A bf16 base under autocast."""
    hidden, inter, layers, heads, vocab = _shape(base)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    base_bytes += sum(b.numel() * b.element_size() for b in base.buffers())
    head = head_modules(base, recipe.model.task)
    head_params = sum(p.numel() for h in head for p in getattr(base, h).parameters())
    if rank is None:
        trainable = sum(p.numel() for p in base.parameters())
    else:
        modules = dict(base.named_modules())
        names = lora_target_names(base, recipe.model.targets, head)
        trainable = head_params + sum(rank * sum(_fan(modules[n])) for n in names)
    seq = tokens_per_example(task, base, recipe)
    tokens = recipe.optim.batch_size * seq
    # Saved for the backward, per token and layer, in bf16: the attention block's inputs, q/k/v and output
    # (~12 widths), the MLP's inputs and its gate, up and product (~4 intermediate widths); attention probabilities
    # where a mask keeps SDPA off its flash kernel (the classifiers)
    per_token = 2 * (12 * hidden + 4 * inter) + (0 if task.kind == "causal-lm" else 5 * heads * seq)
    activations = int(SLACK * tokens * layers * per_token)
    logits = int(SLACK * tokens * vocab * LOGIT_BYTES) if task.kind == "causal-lm" else 0
    weights = trainable * ADAM_BYTES
    # a full-finetuning trial's fp32 weights are its copy of the base; a LoRA trial copies the base as it is
    fixed = 0 if rank is None else base_bytes
    parts = {"weights and optimizer": weights, "activations": activations}
    if logits:
        parts["logits"] = logits
    return TrialMemory(base_bytes, fixed, weights + activations + logits, parts)


def _fan(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # GPT-2's Conv1D keeps its weight as [in, out]
    return int(w.shape[0]), int(w.shape[1])


def usable_bytes(device: str) -> int:
    """What this process may allocate on the GPU: its total memory, or the per-process cap where one is set."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    return int(HEADROOM * total * torch.cuda.get_per_process_memory_fraction(index))


def full_fits(trainer) -> bool:
    """Whether one full-finetuning trial fits where `trainer` runs: the GPU's usable memory, or on the CPU half
    of the machine's memory (the estimate is a bf16 base's; the CPU trains in fp32, twice that)."""
    need = trainer.memory(None).unit(1)
    if trainer.device.startswith("cuda"):
        return need <= usable_bytes(trainer.device)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no measure, no offer
        return False
    return 2 * need <= ram // 2


def warm_capacity(trainer, slots: int, k: int) -> int:
    """Bytes of built units a GPU may keep idle between units (train/warm.py): what is usable beyond `slots`
    running units, each beside its slot's base, of up to `k` LoRA trials (or one full-finetuning trial). None
    on the CPU, whose units are single trials unless asked otherwise."""
    if not trainer.device.startswith("cuda"):
        return 0
    r = trainer.recipe
    running = [trainer.memory(max(r.lora_ranks)).unit(k)] if r.lora_ranks else []
    if r.wants_full:
        running.append(trainer.memory(None).unit(1))
    base = trainer.memory(None).base
    return max(0, usable_bytes(trainer.device) - slots * (base + max(running, default=0)))


@dataclass
class Plan:
    slots: int  # per GPU
    k: int  # LoRA trials per pass at most
    reason: str = ""  # why the plan is smaller than speed alone would make it, if it is


def plan(lora: TrialMemory | None, full: TrialMemory | None, usable: int, want_slots: int, want_k: int) -> Plan:
    """The most slots per GPU (≤ want_slots) whose one-trial units fit side by side, then the largest K
    (≤ want_k) whose pass of batched LoRA trials fits in one slot's share."""
    one = max((m for m in (lora, full) if m is not None), key=lambda m: m.base + m.unit(1))
    slots = want_slots
    while slots > 1 and slots * (one.base + one.unit(1)) > usable:
        slots -= 1
    k = want_k
    if lora is not None:
        share = usable // slots - lora.base
        k = max(1, min(want_k, (share - lora.fixed) // max(1, lora.per_trial)))
    cut = [f"{slots} slot(s) per GPU"] if slots < want_slots else []
    cut += [f"up to {k} trial(s) per pass"] if k < want_k else []
    reason = ""
    if one.base + one.unit(1) > usable:
        reason = (f"memory plan: one trial is estimated at {one.describe(1)} beside a {one.base / GIB:.1f} GiB "
                  f"base, more than the {usable / GIB:.0f} GiB usable; trying anyway")  # fmt: skip
    elif cut:
        pass_ = lora.describe(k) if lora is not None else one.describe(1)
        reason = f"memory plan: {' and '.join(cut)} (a pass: {pass_}; {usable / GIB:.0f} GiB usable)"
    return Plan(slots, k, reason)


def what_fits(mem: TrialMemory, usable: int, batch_size: int) -> str:
    """Advice for a trial that did not fit alone: the batch size the estimate says would."""
    per_example = (mem.per_trial - mem.parts["weights and optimizer"]) / max(1, batch_size)
    room = usable - mem.base - mem.fixed - mem.parts["weights and optimizer"]
    fits = math.floor(room / per_example) if per_example > 0 else 0
    if fits >= 1 and fits < batch_size:
        return f"batch_size {fits} (or a shorter seq_len) would fit by mua's estimate"
    return "a smaller model, batch_size or seq_len, or a GPU with more memory, is needed"
