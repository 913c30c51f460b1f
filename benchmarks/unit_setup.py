"""Where a unit's set-up goes on a GPU: each warm-up step, the capture and the first replays of a sequence of
units, one slot, in one process, so that what a process pays once, what a new shape pays and what every
built unit pays stand apart.

    python benchmarks/unit_setup.py [--only 5m,124m] [--steps 20] [--kernels] [--out FILE.json]

Units, in this order (B:1 unless named; K trials per pass): r16 K=8, r16 K=8 again (nothing new but the
unit), r4 K=8 (new LoRA shapes), A:r r4 K=8 (new regime, same shapes), r4 K=2 (a new pass size), r4 K=1
alone (the unbatched path). Each step and the capture are timed to the GPU's end (synchronized), so the
times add up to the unit's; a sweep overlaps them with the other slot's work.

`--kernels`, after the units: the forward and backward of Liger's rotary kernel and of SDPA's attention (the
kernels a sweep's GPU step runs) at the 5m model's head shape, alone, first at a batch of a pass size no unit
used, then again: what a new pass size costs each of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_speed import recipe_for, seed_cache  # noqa: E402
from record import Recording  # noqa: E402

from mua_cli.accel import graphed  # noqa: E402
from mua_cli.accel.attention import GPU_ORDER, kernels  # noqa: E402
from mua_cli.accel.fused import fuse  # noqa: E402
from mua_cli.spec.trial import TrialSpec  # noqa: E402
from mua_cli.train.batched import run_batched  # noqa: E402
from mua_cli.train.loop import run_trial  # noqa: E402
from mua_cli.train.workload import load_workload  # noqa: E402

UNITS = [("B:1", 16, 8), ("B:1", 16, 8), ("B:1", 4, 8), ("A:r", 4, 8), ("B:1", 4, 2), ("B:1", 4, 1)]


class Timed:
    """Wraps graphed.Step (patched for the whole process): the seconds of every step, and of every capture."""

    def __init__(self):
        self.calls: list[float] = []
        self.capture = 0.0
        self._call, self._capture = graphed.Step.__call__, graphed.Step._capture
        timed = self

        def call(step, params):
            torch.cuda.synchronize()
            t = time.perf_counter()
            timed._call(step, params)
            torch.cuda.synchronize()
            timed.calls.append(time.perf_counter() - t)

        def capture(step, params):
            t = time.perf_counter()
            timed._capture(step, params)
            torch.cuda.synchronize()
            timed.capture += time.perf_counter() - t

        graphed.Step.__call__, graphed.Step._capture = call, capture

    def take(self) -> tuple[list[float], float]:
        out = self.calls, self.capture
        self.calls, self.capture = [], 0.0
        return out


def probe(name: str, steps: int) -> list[dict]:
    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    t = time.perf_counter()
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    fuse(base, "cuda", print)
    torch.cuda.synchronize()
    rows = [{"workload": name, "unit": "load and fuse", "s": round(time.perf_counter() - t, 3)}]
    timed = Timed()
    for regime, rank, k in UNITS:
        specs = [TrialSpec(regime, rank, 2.0 ** (-12 + i), 0) for i in range(k)]
        t = time.perf_counter()
        if k == 1:
            res = [run_trial(specs[0], base, work.task, recipe, "cuda", None, True, print)]
        else:
            res = run_batched(specs, base, work.task, recipe, "cuda", None, True, print)
        wall = time.perf_counter() - t
        calls, capture = timed.take()
        w = graphed.WARMUP
        rows.append({
            "workload": name, "unit": f"{regime} r{rank} K={k}", "s": round(wall, 3),
            "phases_s": res[0].info.get("phases_s"), "status": res[0].status,
            "warmup_steps_s": [round(c, 4) for c in calls[:w]],
            "capture_s": round(capture, 4),
            "capture_step_s": round(calls[w], 4) if len(calls) > w else None,  # the capture and its first replay
            "replay_ms": round(1e3 * sum(calls[w + 1 :]) / max(1, len(calls) - w - 1), 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def first_calls(heads: int = 4, dim: int = 64, seq: int = 512) -> list[dict]:
    """Seconds of the first and the second forward and backward of Liger's rotary kernel and of SDPA at batches
    of 16·K for pass sizes K that no unit used."""
    from liger_kernel.ops.rope import LigerRopeFunction

    def rope(b: int) -> None:
        q, k = (torch.randn(b, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
        cos, sin = torch.randn(1, seq, dim, device="cuda"), torch.randn(1, seq, dim, device="cuda")
        qo, ko = LigerRopeFunction.apply(q, k, cos, sin)
        (qo.float().sum() + ko.float().sum()).backward()

    def attention(b: int) -> None:
        q, k, v = (torch.randn(b, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in "qkv")  # fmt: skip
        with kernels(GPU_ORDER):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

    rows = []
    for name, fn in (("liger rotary", rope), ("SDPA attention", attention)):
        for k in (3, 5, 6):
            row = {"kernel": name, "batch": 16 * k}
            for call in ("first_s", "second_s"):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn(16 * k)
                torch.cuda.synchronize()
                row[call] = round(time.perf_counter() - t, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="5m,124m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kernels", action="store_true", help="then each kernel's first call at a new pass size")
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/unit_setup-<UTC time>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("unit_setup.py times CUDA graph captures: it needs a GPU")
    rec = Recording("unit_setup")
    for name in args.only.split(","):
        for row in probe(name, args.steps):
            rec.add("units", row)
        rec.save(args.out)
    if args.kernels:
        rec.set("first_calls", first_calls())
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
