"""Where a training step's GPU time goes: the top kernels of a few eager steps, by CUDA time.

    python benchmarks/gpu_profile.py [--workload 5m] [--k 8] [--steps 12]

A diagnostic for docs/performance.md: run eagerly (a CUDA graph hides its kernels from the profiler; it
replays the same operations). Also times bf16 GEMMs whose width is or is not a multiple of 8.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from gpu_speed import gemm_seconds, recipe_for, seed_cache

from mua_cli.batched import run_batched
from mua_cli.sweep import make_spec
from mua_cli.tasks import load_workload
from mua_cli.train import run_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="5m")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    for n in (3500, 3584):
        print(f"bf16 GEMM [8192, 1024] × [1024, {n}]: {1e3 * gemm_seconds(8192, 1024, n, reps=20):.3f} ms")
    recipe = dataclasses.replace(recipe_for(args.workload, args.steps), eval_fraction=0.0)
    seed_cache(recipe)
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    specs = [make_spec(recipe, "B:1", 16, 2.0 ** (-12 + i / 2), 0) for i in range(args.k)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        if args.k == 1:
            run_trial(specs[0], base, work.task, recipe, "cuda", graphs=False)
        else:
            run_batched(specs, base, work.task, recipe, "cuda", graphs=False)
        torch.cuda.synchronize()
    print(f"{args.workload}, K={args.k}, {args.steps} eager steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
