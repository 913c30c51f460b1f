"""The plain loop of benchmarks/gpu_speed.py's race, in a process of its own: the loop one writes by hand, over
the trials mua ran, importing what such a loop needs (torch, and through mua's model, data and μA init:
transformers and peft) and not what mua's sweep imports besides (its store, its fit: optuna, pandas, scipy).

    python benchmarks/plain_loop.py --trials TRIALS.json --recipe-file R.yaml --device cuda:0 --out OUT.json

TRIALS.json: a list of [regime, rank, lr, seed], run in that order. OUT.json: the seconds it took to load the
recipe, model and data (after its imports) and to train, each trial's metric, the model's size and the GPU's
peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mua_cli.spec.recipe import Recipe, load_recipe  # noqa: E402
from mua_cli.spec.trial import TrialSpec  # noqa: E402
from mua_cli.train.adapters import head_modules, param_groups, prepare  # noqa: E402
from mua_cli.train.loop import lr_lambda  # noqa: E402
from mua_cli.train.workload import load_workload  # noqa: E402

T0 = time.perf_counter()


def plain_trial(spec, base, task, recipe: Recipe, device: str, times: list | None = None) -> float:
    """The plain loop's trial; returns its metric (the mean training loss of the recipe's last steps, or the
    held-out loss where the recipe's metric is eval; inf if diverged)."""
    o = recipe.optim
    head = head_modules(base, recipe.model.task)
    torch.manual_seed(spec.seed)
    model = prepare(base, spec.regime, spec.rank, o.alpha0, recipe.model.targets, spec.seed, head).to(device).train()
    groups = param_groups(model, spec.regime, spec.lr, head, o.head_lr)
    opt = torch.optim.AdamW(groups.groups, lr=spec.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o))
    batch_at = task.train_batches(spec.seed, o.steps, o.batch_size, device)
    cuda = device.startswith("cuda")
    losses = []
    for step in range(o.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = task.loss(model, batch_at(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(groups.params, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if times is not None:
            times.append(time.perf_counter())
        if not math.isfinite(losses[-1]) or losses[-1] > o.divergence_factor * losses[0]:
            return math.inf
    tail = losses[-max(1, math.ceil(o.metric_frac * len(losses))) :]
    metric = sum(tail) / len(tail)
    if o.metric == "eval" or recipe.data.eval_fraction > 0:
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            scores = task.evaluate(model, o.batch_size, device)
        if o.metric == "eval":
            metric = scores["loss"]
    return metric


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=Path, required=True)
    ap.add_argument("--recipe-file", type=Path, required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    recipe = load_recipe(str(args.recipe_file)).replace(dtype="float32")  # fp32 weights; bf16 autocast on a GPU
    specs = [TrialSpec(regime, int(rank), float(lr), int(seed)) for regime, rank, lr, seed in
             json.loads(args.trials.read_text())]  # fmt: skip
    work = load_workload(recipe, "cpu")  # a classifier's batches padded each to its longest example
    params = sum(p.numel() for p in work.base.parameters())
    load_s = time.perf_counter() - T0
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    rows = [[s.regime, s.rank, s.lr, s.seed, plain_trial(s, work.base, work.task, recipe, args.device)] for s in specs]
    trials_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    out = {"load_s": round(load_s, 2), "trials_s": round(trials_s, 2), "trials": rows,
           "params_M": round(params / 1e6, 1), "peak_gib": peak and round(peak, 1)}  # fmt: skip
    args.out.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
