"""Where a training step's GPU time goes: the top kernels of a few eager steps, and their sum by kind.

    python benchmarks/gpu_profile.py [--workload 5m|124m|350m|vit-base] [--k 8] [--steps 12] [--graphed]
        [--no-fused-kernels]

A diagnostic for docs/performance.md, with Liger's fused kernels where installed, as mua runs. Eager steps by
default; `--graphed` profiles mua's CUDA-graph replays (the first steps run eagerly, so their kernels are
counted too: use enough steps) and prints the wall time per replayed step beside the kernels' sum. Also times
bf16 GEMMs whose width is or is not a multiple of 256.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
from gpu_speed import gemm_seconds, recipe_for, seed_cache

from mua_cli.accel.fused import fuse
from mua_cli.spec.trial import TrialSpec
from mua_cli.train.batched import run_batched
from mua_cli.train.loop import run_trial
from mua_cli.train.workload import load_workload

KINDS = [  # the first pattern a kernel's name matches names its kind (flash kernels' names contain "cutlass")
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitK"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("fused (Triton)", r"triton|rms_norm|rope|swiglu|silu_mul"),
    ("reduction", r"reduce|norm"),
    ("copy / cast", r"copy|Cat|cast"),
    ("elementwise", r"elementwise"),
]


def kind(name: str) -> str:
    return next((k for k, rx in KINDS if re.search(rx, name, re.IGNORECASE)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="5m")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--graphed", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also the operators that launched the kernels, with stacks")
    ap.add_argument("--no-fused-kernels", action="store_true")
    args = ap.parse_args()
    for n in (3500, 3584):
        print(f"bf16 GEMM [8192, 1024] × [1024, {n}]: {1e3 * gemm_seconds(8192, 1024, n):.3f} ms")
    if args.workload == "vit-base":  # cls_speed.py's ViT-Base/16 task, built in a temporary folder
        import tempfile
        from pathlib import Path

        import cls_speed

        tmp = tempfile.TemporaryDirectory()  # removed when this process ends
        made = cls_speed.vit_base(Path(tmp.name), 16 * args.steps + 200, False)
        recipe = cls_speed.recipe_for("vit-base", *made, args.steps).replace(eval_fraction=0.0)
    else:
        recipe = recipe_for(args.workload, args.steps).replace(eval_fraction=0.0)
        seed_cache(recipe)
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    undo = (lambda: None) if args.no_fused_kernels else fuse(base, "cuda", print)
    rank = 8 if args.workload == "vit-base" else 16
    specs = [TrialSpec("B:1", rank, 2.0 ** (-12 + i / 2), 0) for i in range(args.k)]
    marks: list[float] = []
    clock = lambda s, v: marks.append(time.perf_counter())  # noqa: E731  (called every 10 steps, after a sync)
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if args.ops else [])
    with torch.profiler.profile(activities=activities, with_stack=args.ops) as prof:
        if args.k == 1:
            run_trial(specs[0], base, work.task, recipe, "cuda", clock, graphs=args.graphed)
        else:
            run_batched(specs, base, work.task, recipe, "cuda", clock, graphs=args.graphed)
        torch.cuda.synchronize()
    undo()
    fused = "unfused" if args.no_fused_kernels else "fused"
    how = "graphed (the first 3 eager)" if args.graphed else "eager"
    print(f"{args.workload}, K={args.k}, {args.steps} steps {how}, {fused}:")
    if len(marks) >= 2:  # steps 11 on are replays when graphed
        n = 10 * (len(marks) - 1)
        print(f"wall time per step (steps 11..{n + 10}, profiled): {1e3 * (marks[-1] - marks[0]) / n:.2f} ms")
    if args.ops:
        ops = prof.key_averages(group_by_stack_n=6)
        print(ops.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind(e.key)] += e.self_device_time_total
    total = sum(by_kind.values())
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{k:>16}: {us / 1e3 / args.steps:8.2f} ms per step ({us / total:.0%})")


if __name__ == "__main__":
    main()
