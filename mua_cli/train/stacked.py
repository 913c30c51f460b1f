"""Several LoRA trials side by side: the trials of one (regime, rank, seed) differ only in learning rate, so
they share the frozen base, the data and the init.

Each step's batch is repeated K times, copy k running through adapter k (as multi-LoRA serving does). peft
builds the LoRA layers (same targets, same scaling as one trial alone); their lora_A / lora_B are swapped for
stacked [K, out, in] weights, and so are a classifier's head layers, which every trial trains in full at the
fixed head LR. An AdamW over the stack gives every trial its own learning rate, gradient clip and divergence
stop with torch.optim.AdamW's arithmetic, so each trial matches a trial trained alone up to floating-point
rounding (tests/test_batched.py, tests/test_batched_cls.py). The loop that trains them is loop.py's.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from ..accel.attention import model_kernels
from ..science.theory import FULL
from ..spec.config import Optim
from ..spec.recipe import Recipe
from ..spec.trial import TrialSpec
from .adapters import head_modules, prepare


class StackedLinear(torch.nn.Module):
    """K independent linear maps (a bias each, if the layer had one); input rows are grouped by trial:
    [K·B, ..., n_in]."""

    def __init__(self, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.k = k
        self.weight = torch.nn.Parameter(weight.detach().float()[None].repeat(k, 1, 1).contiguous())  # [K, out, in]
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float()[None, None].repeat(k, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xk = x.reshape(self.k, -1, shape[-1])
        cast = not torch.is_autocast_enabled(xk.device.type)
        w = self.weight.to(xk.dtype) if cast else self.weight
        if self.bias is None:
            y = torch.bmm(xk, w.transpose(1, 2))
        else:  # as nn.Linear's: the bias added inside the GEMM, in its dtype (baddbmm autocasts like linear)
            y = torch.baddbmm(self.bias.to(xk.dtype) if cast else self.bias, xk, w.transpose(1, 2))
        return y.reshape(*shape[:-1], y.shape[-1])


class NotBatchable(Exception):
    """The model has a part that batched trials cannot stack (a head with other layers than linear ones)."""


def can_batch(spec: TrialSpec, recipe: Recipe) -> bool:
    """LoRA trials with one LR for every adapted weight; full finetuning and per-layer LRs run one by one."""
    return spec.regime != FULL and not recipe.optim.per_layer_lr


def build(base: torch.nn.Module, spec: TrialSpec, recipe: Recipe, k: int) -> tuple[torch.nn.Module, list, list]:
    """The serial path's model (peft, the exact init draws), its adapters then copied K times; a classifier's
    head, which trains in full, too. Returns the model, the adapters' and the head's stacked weights."""
    head = head_modules(base, recipe.model.task)
    model = prepare(base, spec.regime, spec.rank, recipe.optim.alpha0, recipe.model.targets, spec.seed, head)
    params = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            for holder in (module.lora_A, module.lora_B):
                stacked = StackedLinear(holder["default"].weight, k)
                holder["default"] = stacked
                params.append(stacked.weight)
    head_params = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] in head:
            head_params += _stack_head(module.modules_to_save, k)
    return model, params, head_params


def _stack_head(holder: torch.nn.ModuleDict, k: int) -> list[torch.Tensor]:
    trained = holder["default"]
    linears = [(n, m) for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear)]
    if sum(p.numel() for _, m in linears for p in m.parameters()) != sum(p.numel() for p in trained.parameters()):
        raise NotBatchable("the head has layers other than linear ones")
    out = []
    for name, m in linears:
        stacked = StackedLinear(m.weight, k, m.bias)
        if name:
            parent, _, leaf = name.rpartition(".")
            setattr(trained.get_submodule(parent) if parent else trained, leaf, stacked)
        else:
            holder["default"] = stacked
        out += [p for p in (stacked.weight, stacked.bias) if p is not None]
    return out


class StackedAdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with per-trial LR vectors, one per
    group of weights (the adapters at the trials' LRs, a head at its fixed one), and per-trial gradient-norm
    clipping over every group. A stopped trial gets LR 0 and its gradients zeroed: it stays frozen."""

    def __init__(self, groups: list[list[torch.Tensor]], o: Optim):
        self.groups = groups
        self.params = [p for g in groups for p in g]
        self.b1, self.b2 = o.betas
        self.eps, self.wd, self.clip = o.eps, o.weight_decay, o.grad_clip
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = torch.zeros((), device=self.params[0].device)  # a tensor, so that a captured step counts too

    @torch.no_grad()
    def step(self, lrs: list[torch.Tensor], alive: torch.Tensor) -> None:
        """`lrs`: a [K] vector per group (a group of stacked weights given at construction, in that order)."""
        self.t += 1
        grads = [p.grad for p in self.params]
        k = alive.shape[0]
        coef = torch.ones(k, device=alive.device)
        if self.clip > 0:
            sq = torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in grads]).sum(0)  # [K]
            coef = (self.clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        bc1, bc2_sqrt = 1 - self.b1**self.t, (1 - self.b2**self.t).sqrt()
        lr_of = [lr for lr, g in zip(lrs, self.groups, strict=True) for _ in g]
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, lr_of, strict=True):
            shape = (-1, *[1] * (p.dim() - 1))
            # torch.where, not a product: a stopped trial's NaN gradient must not reach its moments
            g = torch.where(alive.view(shape), g * coef.view(shape), 0.0)
            lr_k = lr.view(shape)
            p.mul_(1 - lr_k * self.wd)
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m * (lr_k / bc1), denom, value=-1.0)
            p.grad = None


def per_trial_loss(task, model, batch, k: int) -> torch.Tensor:
    """Each trial's mean loss over its copy of the batch (rows grouped by trial)."""
    if task.kind == "causal-lm":
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    else:
        logits = task.logits(model, batch)
        ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
    return ce.view(k, -1).mean(1)


def repeat(batch, k: int):
    """The batch K times over, copy after copy (a tensor or a dict of them)."""
    if isinstance(batch, dict):
        return {name: repeat(v, k) for name, v in batch.items()}
    return batch.repeat(k, *[1] * (batch.dim() - 1))


@torch.no_grad()
def evaluate_stacked(model, task, batch_size: int, k: int, device: str) -> dict:
    """Each trial's held-out loss (and a classifier's accuracy), on the batches the serial path evaluates."""
    model.eval()
    low = next(model.parameters()).dtype != torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and low), \
            model_kernels(model, device):  # fmt: skip
        if task.kind == "causal-lm":
            batches = task.data.eval_batches(batch_size)
            total = sum(per_trial_loss(task, model, repeat(b.to(device), k), k) for b in batches)
            scores = {"loss": total / len(batches)}
        else:
            scores = _evaluate_classifier(model, task, batch_size, k, device)
    model.train()
    return {name: v.cpu() for name, v in scores.items()}


def _evaluate_classifier(model, task, batch_size: int, k: int, device: str) -> dict:
    total = torch.zeros(k, device=device)
    correct = torch.zeros(k, device=device)
    n = 0
    for idx in task.eval_chunks(batch_size):
        batch = repeat(task.batch(idx, device), k)
        logits = task.logits(model, batch).float()
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        total += ce.view(k, -1).sum(1)
        correct += (logits.argmax(-1) == batch["labels"]).view(k, -1).sum(1)
        n += len(idx)
    return {"loss": total / n, "accuracy": correct.double() / n}  # double: the serial path's Python division
