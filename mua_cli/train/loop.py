"""The training loop: where every trial's steps run, one trial alone or several LoRA trials side by side.

`train_steps` is the one loop. It asks a `Trainer` for the rest: one trial's model with torch's AdamW
(`run_trial`), or K trials that differ only in LR, stacked in one model with a per-trial AdamW (batched.py).
On the CPU it is a plain PyTorch loop; on a GPU the same loop replays each step as a CUDA graph (accel.step)
and reads the losses every CHECK_EVERY steps, so that the host never waits for the device.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import accel
from ..accel.attention import model_kernels
from ..accel.graphed import WARMUP, set_lrs
from ..spec.config import Optim
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .adapters import head_modules, param_groups, prepare
from .models import hidden_size
from .tasks import as_task

CHECK_EVERY = 10  # on a GPU, losses are read (and divergence checked) every this many steps


def lr_lambda(o: Optim) -> Callable[[int], float]:
    """Linear warmup over warmup_frac of the steps, then cosine decay to min_lr_ratio × peak."""
    warm = max(1, int(round(o.warmup_frac * o.steps)))
    total, floor = o.steps, o.min_lr_ratio

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


@dataclass
class Trainer:
    """What the loop needs of the trials it trains (K of them: 1 alone, or K batched)."""

    model: torch.nn.Module
    params: list[torch.Tensor]  # the trainable tensors; their gradients are unset before a graph capture
    k: int
    step: Callable[[], None]  # forward, backward, clip and update on the current batch; each loss into `loss`
    loss: torch.Tensor  # [K]: the last step's loss of each trial
    set_lr: Callable[[float], None]  # the schedule's factor for the next step
    load: Callable[[object], None]  # the next step's batch, put where `step` reads it
    graphs: bool  # whether the step may be replayed as a CUDA graph (the batches keep one shape)


def train_steps(t: Trainer, o: Optim, batch_at, device: str, on_step=None, on_note=None,
                clock: dict | None = None, step_fn=None) -> list[list[float]]:  # fmt: skip
    """The loop: every step's LR, batch and update; each trial's loss curve, up to the check after the last
    trial diverged (finish() cuts each curve at its own first divergence). `clock`: gets `first_steps_at`, the
    time the warm-up steps and the capture were done (accel/graphed.py's WARMUP + 1 steps). `step_fn`: a step
    (accel.step) that outlives this loop, with its CUDA graph (Batched); else one made and closed here."""
    own = step_fn is None
    step_fn = step_fn or accel.step(t.step, t.model, device, t.graphs, on_note)
    check = 1 if device == "cpu" else CHECK_EVERY
    schedule = lr_lambda(o)
    losses = torch.full((o.steps, t.k), math.nan, device=device)  # stays on the device between checks
    curves: list[list[float]] = [[] for _ in range(t.k)]
    for step in range(o.steps):
        t.set_lr(schedule(step))
        t.load(batch_at(step))
        step_fn(t.params)
        losses[step] = t.loss
        if clock is not None and step == WARMUP:
            clock["first_steps_at"] = time.perf_counter()
        if (step + 1) % check == 0 or step + 1 == o.steps:
            for curve, new in zip(curves, losses[len(curves[0]) : step + 1].T.tolist(), strict=True):
                curve += new
            live = [c[-1] for c in curves if first_divergence(c, o.divergence_factor) is None]
            if on_step:  # progress, and where a pool's Ctrl-C stops the trials
                on_step(step, min(live) if live else curves[0][-1])
            if not live:
                break
    if own:
        step_fn.close()
    return curves


def finish(values: list[float], o: Optim, device: str) -> TrialResult:
    """A loss curve → a result: the curve ends at its first diverging step (included); the metric of a
    finished trial is the training loss averaged over the last `metric_frac` of its steps."""
    cut = first_divergence(values, o.divergence_factor)
    curve = [round(v, 5) if math.isfinite(v) else v for v in values[: None if cut is None else cut + 1]]
    result = TrialResult("ok" if cut is None else "diverged", math.inf, curve, initial_loss=curve[0], device=device)
    if cut is None:
        tail = curve[-max(1, int(math.ceil(o.metric_frac * len(curve)))) :]
        result.metric = sum(tail) / len(tail)
    return result


def set_eval(result: TrialResult, eval_loss: float, o: Optim) -> None:
    result.eval_loss = eval_loss
    if o.metric == "eval":
        result.metric = eval_loss
    if not math.isfinite(result.metric):
        result.status, result.metric = "diverged", math.inf


def bf16_autocast(device: str):
    # autocast's weight-cast cache cannot live across graph replays; the base is bf16 where it matters
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=accel.is_gpu(device), cache_enabled=False)


def failed_results(e: Exception, n: int, device: str, t0: float) -> list[TrialResult]:
    error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    return [TrialResult("failed", math.nan, wall_time=time.perf_counter() - t0, device=device, error=error)
            for _ in range(n)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ one trial


def run_trial(
    spec: TrialSpec,
    base: torch.nn.Module,
    data,
    recipe: Recipe,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    graphs: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> TrialResult:
    """Train one trial. Divergence is a result, not an error; any other exception is a failed trial.
    `graphs`: on a GPU, replay the step as a CUDA graph where the task's batches keep one shape."""
    t0 = time.perf_counter()
    try:
        return _train(spec, base, data, recipe, device, on_step, t0, graphs, on_note)
    except (KeyboardInterrupt, SystemExit, torch.cuda.OutOfMemoryError):
        raise  # out of memory: the runner tries again with less on the GPU (sweep/runner.py)
    except Exception as e:  # a failed trial is stored with its error; the sweep goes on
        return failed_results(e, 1, device, t0)[0]


def _train(spec, base, data, recipe, device, on_step, t0, graphs, on_note) -> TrialResult:
    task, o = as_task(data), recipe.optim
    head = head_modules(base, recipe.model.task)
    torch.manual_seed(spec.seed)
    model = prepare(base, spec.regime, spec.rank, o.alpha0, recipe.model.targets, spec.seed, head).to(device)
    model.train()
    accel.prepare(model, device, task.unpadded, recipe.data.seq_len)
    groups = param_groups(model, spec.regime, spec.lr, head, o.head_lr, o.per_layer_lr, hidden_size(base))
    t = _one(model, groups, spec, task, o, device, graphs)
    clock = {"ready_at": time.perf_counter()}
    curve = train_steps(t, o, task.train_batches(spec.seed, o.steps, o.batch_size, device), device, on_step,
                        on_note, clock)[0]  # fmt: skip
    clock["steps_at"] = time.perf_counter()
    result = finish(curve, o, device)
    result.info = _info(o, task, groups, head, base)
    if result.status == "ok" and (o.metric == "eval" or recipe.data.eval_fraction > 0):
        low = next(base.parameters()).dtype != torch.float32  # a bf16 base evaluates under autocast too
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=accel.is_gpu(device) and low), \
                model_kernels(model, device), torch.no_grad():  # fmt: skip
            model.eval()
            scores = task.evaluate(model, o.batch_size, device)
        set_eval(result, scores["loss"], o)
        if "accuracy" in scores:
            result.info["eval_accuracy"] = scores["accuracy"]
    result.wall_time = time.perf_counter() - t0
    result.info["phases_s"] = phases(t0, clock)
    return result


def phases(t0: float, clock: dict) -> dict[str, float]:
    """Where a unit's seconds went: building its model and optimizer, the first steps (warm-up and, on a GPU,
    the capture), the other steps (on a GPU up to their losses read back), and the rest (evaluation)."""
    end = time.perf_counter()
    first = clock.get("first_steps_at", clock["steps_at"])
    return {"build": round(clock["ready_at"] - t0, 3), "first_steps": round(first - clock["ready_at"], 3),
            "steps": round(clock["steps_at"] - first, 3), "after": round(end - clock["steps_at"], 3)}  # fmt: skip


def _one(model, groups, spec: TrialSpec, task, o: Optim, device: str, graphs: bool) -> Trainer:
    """One trial: torch's AdamW over its LR groups (adapters, a head at its fixed LR, per-layer LRs)."""
    gpu = accel.is_gpu(device)
    peaks = [g.get("lr", spec.lr) for g in groups.groups]
    # On a GPU the LRs are device tensors, updated in place: a captured step reads them (accel/graphed.py)
    lr_of = (lambda x: torch.tensor(float(x), device=device)) if gpu else float
    opt = torch.optim.AdamW(
        [{**g, "lr": lr_of(p)} for g, p in zip(groups.groups, peaks, strict=True)],
        lr=lr_of(spec.lr),
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=gpu or None,
        capturable=gpu,
    )
    params, autocast, fixed = groups.params, bf16_autocast(device), task.fixed_shape
    batch: dict = {}  # a fixed-shape batch is copied into one buffer that a graph can read
    loss_out = torch.zeros(1, device=device)

    def load(b) -> None:
        if fixed and "x" in batch:
            copy_batch(batch["x"], b)
        else:
            batch["x"] = clone_batch(b) if fixed else b

    def one_step() -> None:
        with autocast:
            loss = task.loss(model, batch["x"])
        loss_out.copy_(loss.detach().view(1))
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Trainer(model, params, 1, one_step, loss_out, lambda f: set_lrs(opt, peaks, f), load, graphs and fixed)


def _info(o: Optim, task, groups, head, base) -> dict:
    """What the trial trained and how: stored with it (the head's fixed LR, the LR groups, dtypes)."""
    info = {
        "task": task.kind,
        "trainable_params": sum(p.numel() for p in groups.params),
        "lr_groups": [dataclasses.asdict(g) for g in groups.info],
        "base_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
    }
    if head:
        info["head"] = {"modules": list(head), "lr": o.head_lr, "trained": "in full (not LoRA)"}
    return info


def clone_batch(batch):
    """A buffer for the step's batch (a tensor or a dict of them) that lives as long as the trial."""
    return {k: v.clone() for k, v in batch.items()} if isinstance(batch, dict) else batch.clone()


def copy_batch(dst, src) -> None:
    if isinstance(dst, dict):
        for k, v in dst.items():
            v.copy_(src[k])
    else:
        dst.copy_(src)
