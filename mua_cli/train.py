"""One trial: a TrialSpec in, a TrialResult out (loss curve, final metric, status, timings)."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable

import torch

from .adapters import prepare, trainable_parameters
from .data import TokenData
from .models import lm_loss
from .recipe import Recipe
from .trial import TrialResult, TrialSpec


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """Linear warmup over warmup_frac of the steps, then cosine decay to min_lr_ratio × peak."""
    warm = max(1, int(round(recipe.warmup_frac * recipe.steps)))
    total, floor = recipe.steps, recipe.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def run_trial(
    spec: TrialSpec,
    base: torch.nn.Module,
    data: TokenData,
    recipe: Recipe,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> TrialResult:
    """Train one trial. Divergence is a result, not an error; any other exception is a failed trial."""
    t0 = time.perf_counter()
    try:
        return _train(spec, base, data, recipe, device, on_step, t0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a failed trial is stored with its error; the sweep goes on
        tb = traceback.format_exc(limit=3)
        return TrialResult("failed", math.nan, wall_time=time.perf_counter() - t0, device=device,
                           error=f"{type(e).__name__}: {e}\n{tb}")


def _train(spec, base, data, recipe, device, on_step, t0) -> TrialResult:
    torch.manual_seed(spec.seed)
    model = prepare(base, spec.regime, spec.rank, recipe.alpha0, recipe.targets, spec.seed).to(device)
    model.train()
    params = trainable_parameters(model)
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                            weight_decay=recipe.weight_decay, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    starts = data.batch_starts(spec.seed, recipe.steps, recipe.batch_size)
    tokens = data.train.to(device)
    starts = starts.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    curve: list[float] = []
    status = "ok"
    for step in range(recipe.steps):
        batch = data.windows(tokens, starts[step])
        with autocast:
            loss = lm_loss(model, batch)
        value = float(loss.detach())
        curve.append(round(value, 5) if math.isfinite(value) else value)
        if not math.isfinite(value) or value > recipe.divergence_factor * curve[0]:
            status = "diverged"
            break
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step, value)
    result = TrialResult(status, math.inf, curve, initial_loss=curve[0], device=device)
    if status == "ok":
        tail = curve[-max(1, int(math.ceil(recipe.metric_frac * len(curve)))) :]
        result.metric = sum(tail) / len(tail)
        if recipe.metric == "eval" or recipe.eval_fraction > 0:
            result.eval_loss = evaluate(model, data, recipe.batch_size, device)
        if recipe.metric == "eval":
            result.metric = result.eval_loss
        if not math.isfinite(result.metric):
            result.status, result.metric = "diverged", math.inf
    result.wall_time = time.perf_counter() - t0
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, batch_size: int, device: str) -> float:
    model.eval()
    losses = [float(lm_loss(model, b.to(device))) for b in data.eval_batches(batch_size)]
    model.train()
    return sum(losses) / len(losses)
