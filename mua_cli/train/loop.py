"""One trial: a TrialSpec in, a TrialResult out (loss curve, final metric, status, timings)."""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable

import torch

from ..accel.attention import drop_causal_mask, model_kernels, step_kernels
from ..accel.graphed import Step, set_lrs
from ..accel.lora_addmm import fold_lora_adds
from ..accel.lora_gpu import precast_adapters
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .adapters import head_modules, param_groups, prepare, skip_input_casts
from .data import TokenData
from .models import hidden_size, lm_loss
from .tasks import as_task

CHECK_EVERY = 10  # on a GPU, losses are read (and divergence checked) every this many steps


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


def first_divergence(values: list[float], factor: float) -> int | None:
    """The first step whose loss is non-finite or above `factor` × the starting loss."""
    for i, v in enumerate(values):
        if not math.isfinite(v) or v > factor * values[0]:
            return i
    return None


def finish(values: list[float], recipe: Recipe, device: str) -> TrialResult:
    """A loss curve → a result: the curve ends at its first diverging step (included); the metric of a
    finished trial is the training loss averaged over the last `metric_frac` of its steps."""
    cut = first_divergence(values, recipe.divergence_factor)
    curve = [round(v, 5) if math.isfinite(v) else v for v in values[: None if cut is None else cut + 1]]
    result = TrialResult("ok" if cut is None else "diverged", math.inf, curve, initial_loss=curve[0], device=device)
    if cut is None:
        tail = curve[-max(1, int(math.ceil(recipe.metric_frac * len(curve)))) :]
        result.metric = sum(tail) / len(tail)
    return result


def fast_forward(model: torch.nn.Module, recipe: Recipe, device: str, causal_lm: bool) -> None:
    """The forward's speed-ups, for serial and batched trials alike (docs/performance.md). Each computes the
    same arithmetic; the whole-layer LoRA function rounds at other places (bf16 on a GPU: tests/test_lora_addmm.py)."""
    fold_lora_adds(model, whole_layer=device.startswith("cuda"))
    if device.startswith("cuda"):
        precast_adapters(model)
        skip_input_casts(model)
        if causal_lm:
            drop_causal_mask(model, recipe.seq_len)


def set_eval(result: TrialResult, eval_loss: float, recipe: Recipe) -> None:
    result.eval_loss = eval_loss
    if recipe.metric == "eval":
        result.metric = eval_loss
    if not math.isfinite(result.metric):
        result.status, result.metric = "diverged", math.inf


def run_trial(
    spec: TrialSpec,
    base: torch.nn.Module,
    data: TokenData,
    recipe: Recipe,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    graphs: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> TrialResult:
    """Train one trial. Divergence is a result, not an error; any other exception is a failed trial.
    `graphs`: on a GPU, replay the step as a CUDA graph (graphed.py) where the task's batches keep one shape."""
    t0 = time.perf_counter()
    try:
        return _train(spec, base, data, recipe, device, on_step, t0, graphs, on_note)
    except (KeyboardInterrupt, SystemExit, torch.cuda.OutOfMemoryError):
        raise  # out of memory: the runner tries again with less on the GPU (runner.py)
    except Exception as e:  # a failed trial is stored with its error; the sweep goes on
        tb = traceback.format_exc(limit=3)
        return TrialResult(
            "failed",
            math.nan,
            wall_time=time.perf_counter() - t0,
            device=device,
            error=f"{type(e).__name__}: {e}\n{tb}",
        )


def _train(spec, base, data, recipe, device, on_step, t0, graphs, on_note) -> TrialResult:
    task = as_task(data)
    head = head_modules(base, recipe.task)
    torch.manual_seed(spec.seed)
    model = prepare(base, spec.regime, spec.rank, recipe.alpha0, recipe.targets, spec.seed, head).to(device)
    model.train()
    fast_forward(model, recipe, device, task.kind == "causal-lm")
    groups = param_groups(model, spec.regime, spec.lr, head, recipe.head_lr, recipe.per_layer_lr, hidden_size(base))
    params = groups.params
    cuda = device.startswith("cuda")
    peaks = [g.get("lr", spec.lr) for g in groups.groups]
    # On a GPU the LRs are device tensors, updated in place: a captured step reads them (graphed.py)
    lr_of = (lambda x: torch.tensor(float(x), device=device)) if cuda else float
    opt = torch.optim.AdamW(
        [{**g, "lr": lr_of(p)} for g, p in zip(groups.groups, peaks, strict=True)],
        lr=lr_of(spec.lr),
        betas=tuple(recipe.betas),
        eps=recipe.eps,
        weight_decay=recipe.weight_decay,
        fused=cuda or None,
        capturable=cuda,
    )
    schedule = lr_lambda(recipe)
    batch_at = task.train_batches(spec.seed, recipe.steps, recipe.batch_size, device)
    # autocast's weight-cast cache cannot live across graph replays; the base is bf16 where it matters
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda, cache_enabled=False)
    fixed = task.fixed_shape  # batches of one shape are copied into one buffer that a graph can read
    batch = clone_batch(batch_at(0)) if fixed else None
    loss_out = torch.zeros((), device=device)

    def one_step() -> None:
        with autocast:
            loss = task.loss(model, batch)
        loss_out.copy_(loss.detach())
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_fn = Step(one_step, device, graphs and fixed, on_note, step_kernels(model))
    # Losses stay on the device and are read every `check` steps: the step loop never waits for the host.
    check = 1 if device == "cpu" else CHECK_EVERY
    losses = torch.full((recipe.steps,), math.nan, device=device)
    seen: list[float] = []
    for step in range(recipe.steps):
        set_lrs(opt, peaks, schedule(step))
        if fixed:
            copy_batch(batch, batch_at(step))
        else:
            batch = batch_at(step)
        step_fn(params)
        losses[step] = loss_out
        if (step + 1) % check == 0 or step + 1 == recipe.steps:
            seen += losses[len(seen) : step + 1].tolist()
            if on_step:
                on_step(step, seen[-1])
            if first_divergence(seen, recipe.divergence_factor) is not None:
                break
    step_fn.close()
    result = finish(seen, recipe, device)
    result.info = _info(recipe, task, groups, head, base)
    if result.status == "ok" and (recipe.metric == "eval" or recipe.eval_fraction > 0):
        low = next(base.parameters()).dtype != torch.float32  # a bf16 base evaluates under autocast too
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and low), \
                model_kernels(model, device):  # fmt: skip
            scores = evaluate_task(model, task, recipe.batch_size, device)
        set_eval(result, scores["loss"], recipe)
        if "accuracy" in scores:
            result.info["eval_accuracy"] = scores["accuracy"]
    result.wall_time = time.perf_counter() - t0
    return result


def clone_batch(batch):
    """A buffer for the step's batch (a tensor or a dict of them) that lives as long as the trial."""
    return {k: v.clone() for k, v in batch.items()} if isinstance(batch, dict) else batch.clone()


def copy_batch(dst, src) -> None:
    if isinstance(dst, dict):
        for k, v in dst.items():
            v.copy_(src[k])
    else:
        dst.copy_(src)


def _info(recipe, task, groups, head, base) -> dict:
    """What the trial trained and how: stored with it (the head's fixed LR, the LR groups, dtypes)."""
    info = {
        "task": task.kind,
        "trainable_params": sum(p.numel() for p in groups.params),
        "lr_groups": [dataclasses.asdict(g) for g in groups.info],
        "base_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
    }
    if head:
        info["head"] = {"modules": list(head), "lr": recipe.head_lr, "trained": "in full (not LoRA)"}
    return info


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, task, batch_size: int, device: str) -> dict:
    model.eval()
    scores = task.evaluate(model, batch_size, device)
    model.train()
    return scores


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, batch_size: int, device: str) -> float:
    model.eval()
    losses = [float(lm_loss(model, b.to(device))) for b in data.eval_batches(batch_size)]
    model.train()
    return sum(losses) / len(losses)
