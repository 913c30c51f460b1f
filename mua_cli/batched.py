"""Several LoRA trials in one forward pass: the trials of one (regime, rank, seed) differ only in learning
rate, so they share the frozen base, the data and the init, and can train side by side.

Each step's batch is repeated K times, copy k running through adapter k (as multi-LoRA serving does). peft
builds the LoRA layers (same targets, same scaling as the serial path); their lora_A / lora_B are swapped for
stacked [K, out, in] weights. An AdamW over the stack gives every trial its own learning rate, gradient clip
and divergence stop with torch.optim.AdamW's arithmetic, so each trial matches the serial path up to
floating-point rounding (tests/test_batched.py checks it).
"""

from __future__ import annotations

import math
import time
import traceback

import torch
from peft.tuners.lora import LoraLayer

from .adapters import prepare
from .attention import model_kernels, step_kernels
from .graphed import Step
from .recipe import Recipe
from .tasks import LMTask
from .theory import FULL
from .train import CHECK_EVERY, fast_forward, finish, lr_lambda, set_eval
from .trial import TrialResult, TrialSpec


class StackedLinear(torch.nn.Module):
    """K independent bias-free linear maps; input rows are grouped by trial: [K·B, ..., n_in]."""

    def __init__(self, weight: torch.Tensor, k: int):
        super().__init__()
        self.k = k
        self.weight = torch.nn.Parameter(weight.detach().float()[None].repeat(k, 1, 1).contiguous())  # [K, out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xk = x.reshape(self.k, -1, shape[-1])
        w = self.weight.to(xk.dtype) if not torch.is_autocast_enabled(xk.device.type) else self.weight
        y = torch.bmm(xk, w.transpose(1, 2))
        return y.reshape(*shape[:-1], y.shape[-1])


def can_batch(spec: TrialSpec, recipe: Recipe) -> bool:
    """LoRA trials of a causal LM with one LR for every weight; the rest run one by one."""
    return spec.regime != FULL and recipe.task == "causal-lm" and not recipe.per_layer_lr


def build(base: torch.nn.Module, spec: TrialSpec, recipe: Recipe, k: int) -> tuple[torch.nn.Module, list]:
    """The serial path's model (peft, the exact init draws), its adapters then copied K times."""
    model = prepare(base, spec.regime, spec.rank, recipe.alpha0, recipe.targets, spec.seed)
    params = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            for holder in (module.lora_A, module.lora_B):
                stacked = StackedLinear(holder["default"].weight, k)
                holder["default"] = stacked
                params.append(stacked.weight)
    return model, params


class StackedAdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with a per-trial LR vector and
    per-trial gradient-norm clipping. A stopped trial gets LR 0 and its gradients zeroed: it stays frozen."""

    def __init__(self, params: list[torch.Tensor], recipe: Recipe):
        self.params = params
        self.b1, self.b2 = recipe.betas
        self.eps, self.wd, self.clip = recipe.eps, recipe.weight_decay, recipe.grad_clip
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros((), device=params[0].device)  # a tensor, so that a captured step counts too

    @torch.no_grad()
    def step(self, lr: torch.Tensor, alive: torch.Tensor) -> None:
        self.t += 1
        grads = [p.grad for p in self.params]
        k = lr.shape[0]
        coef = torch.ones(k, device=lr.device)
        if self.clip > 0:
            sq = torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in grads]).sum(0)  # [K]
            coef = (self.clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        bc1, bc2_sqrt = 1 - self.b1**self.t, (1 - self.b2**self.t).sqrt()
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
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


def per_trial_loss(model, batch: torch.Tensor, k: int) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    return ce.view(k, -1).mean(1)


def run_batched(
    specs: list[TrialSpec],
    base: torch.nn.Module,
    task: LMTask,
    recipe: Recipe,
    device: str = "cpu",
    on_step=None,
    graphs: bool = True,
    on_note=None,
) -> list[TrialResult]:
    """Train trials that differ only in LR together; any error fails them all (with the error)."""
    t0 = time.perf_counter()
    try:
        return _train(specs, base, task, recipe, device, on_step, t0, graphs, on_note)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise  # the caller splits the group and tries again
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        return [TrialResult("failed", math.nan, wall_time=time.perf_counter() - t0, device=device, error=error)
                for _ in specs]  # fmt: skip


def _train(specs, base, task, recipe, device, on_step, t0, graphs, on_note) -> list[TrialResult]:
    first = specs[0]
    if any((s.regime, s.rank, s.seed) != (first.regime, first.rank, first.seed) for s in specs):
        raise ValueError("batched trials must share regime, rank and seed")
    k = len(specs)
    model, params = build(base, first, recipe, k)
    model.to(device).train()
    fast_forward(model, recipe, device, causal_lm=True)
    opt = StackedAdamW(params, recipe)
    peak = torch.tensor([s.lr for s in specs], device=device, dtype=torch.float32)
    schedule = lr_lambda(recipe)
    batch_at = task.train_batches(first.seed, recipe.steps, recipe.batch_size, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"), cache_enabled=False)
    check = 1 if device == "cpu" else CHECK_EVERY
    # What a captured step reads and writes lives as long as the trials (graphed.py)
    batch = batch_at(0).clone()
    lr = torch.zeros(k, device=device)
    loss_out = torch.zeros(k, device=device)
    alive = torch.ones(k, dtype=torch.bool, device=device)
    start = torch.full((k,), math.nan, device=device)  # each trial's first loss, set by the first step

    def one_step() -> None:
        with autocast:
            loss = per_trial_loss(model, batch.repeat(k, 1), k)
        loss_out.copy_(loss.detach())
        start.copy_(torch.where(start.isnan(), loss_out, start))
        alive.logical_and_(torch.isfinite(loss_out) & (loss_out <= recipe.divergence_factor * start))
        # torch.where, not a product: a stopped trial's NaN × 0 would still be NaN
        torch.where(alive, loss, torch.zeros_like(loss)).sum().backward()
        opt.step(lr * alive, alive)

    step_fn = Step(one_step, device, graphs, on_note, step_kernels(model))
    losses = torch.full((recipe.steps, k), math.nan, device=device)
    seen = 0
    for step in range(recipe.steps):
        lr.copy_(peak * schedule(step))
        batch.copy_(batch_at(step))
        step_fn(params)
        losses[step] = loss_out
        if (step + 1) % check == 0 or step + 1 == recipe.steps:
            seen = step + 1
            if on_step:
                on_step(step, float(losses[step][alive].min()) if bool(alive.any()) else math.nan)
            if not bool(alive.any()):
                break
    step_fn.close()
    curves = losses[:seen].T.tolist()
    results = [finish(c, recipe, device) for c in curves]
    if recipe.metric == "eval" or recipe.eval_fraction > 0:
        evals = _evaluate(model, task, recipe, k, device)
        for r, e in zip(results, evals, strict=True):
            if r.status == "ok":
                set_eval(r, float(e), recipe)
    wall = (time.perf_counter() - t0) / k
    n_params = sum(p[0].numel() for p in params)
    for r in results:
        r.wall_time = wall
        r.info = {"task": task.kind, "trainable_params": n_params, "batched_with": k,
                  "base_dtype": str(next(base.parameters()).dtype).replace("torch.", "")}  # fmt: skip
    return results


@torch.no_grad()
def _evaluate(model, task: LMTask, recipe: Recipe, k: int, device: str) -> torch.Tensor:
    model.eval()
    low = next(model.parameters()).dtype != torch.float32
    batches = task.data.eval_batches(recipe.batch_size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and low), \
            model_kernels(model, device):  # fmt: skip
        total = sum(per_trial_loss(model, b.to(device).repeat(k, 1), k) for b in batches)
    model.train()
    return (total / len(batches)).cpu()
