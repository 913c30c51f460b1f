"""What a second GPU's slot costs to start, as a thread of the mua process and as a worker process, and the
two-GPU sweep time these predict, all measured on one GPU (for when no machine of several GPUs is lent).

    python benchmarks/pool_start.py [--workload 5m] [--steps 300] [--out FILE]   # default benchmarks/out/

1. cuda_context_s: this process's first CUDA call (a CUDA context; another GPU's slot pays its own).
2. The workload's sweep on cuda:0 in this process (`mua_cli.api.run_sweep`, timed from the call): its
   wall time, when its first trial started, and each unit's seconds (the wall times of its trials, summed).
3. A slot's start on cuda:0, after a first model is loaded in the main thread (as the pool does): a Trainer
   loaded in a thread of this process (pool.Pool with CUDA graphs), and a slot process
   (pool.slot_process, spawned) until it reports ready.
4. The prediction, by arithmetic on 2 and 3, not a measurement on two GPUs: the units in the pool's queue order,
   each to the first free slot; the first slot free when the one-GPU run's first trial started, the second
   that plus the thread's start (plus cuda_context_s) or the worker's; plus the one-GPU run's time after its
   last unit. Scaling = the one-GPU time over the prediction; also with the longest units queued first, and with
   no start cost at all.
5. The pool's threads sharing cuda:0 (`--workers-per-gpu 2`): the threaded code run on a GPU, its wall time and
   whether its best LRs are the one-slot run's. One GPU does the same work either way: not a scaling number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_speed import recipe_for, seed_cache  # noqa: E402
from record import Recording  # noqa: E402

from mua_cli.api import Execution, Listener, Recipe, load_trials, run_sweep  # noqa: E402
from mua_cli.sweep.grid import grid_plan  # noqa: E402
from mua_cli.sweep.pool import slot_process  # noqa: E402
from mua_cli.sweep.sizing import trials_per_pass, units  # noqa: E402
from mua_cli.sweep.trainer import Trainer  # noqa: E402


def best_lrs(metrics: dict) -> dict:
    out = {}
    for (reg, rank, lr), m in metrics.items():
        if math.isfinite(m) and ((reg, rank) not in out or m < out[(reg, rank)][1]):
            out[(reg, rank)] = (lr, m)
    return {f"{k[0]} r={k[1]}": v[0] for k, v in out.items()}


class Clock(Listener):
    """When the trials could begin: the first trial started in this process, or the pool (several slots) said
    its first slot was ready (its note)."""

    ready: float | None = None
    fallbacks = 0  # steps that could not be captured and ran eagerly

    def note(self, message: str) -> None:
        if "slot(s)" in message and self.ready is None:  # the pool's note once its first slot's model is loaded
            self.ready = time.perf_counter()
        self.fallbacks += "capture failed" in message

    def trial_start(self, spec) -> None:
        if self.ready is None:
            self.ready = time.perf_counter()


def timed_sweep(recipe: Recipe, gpus: int, ex: Execution) -> dict:
    """mua's sweep of the recipe on cuda:0 (gpus=1) or on every visible GPU, timed from the call."""
    with tempfile.TemporaryDirectory() as d:
        t0, clock = time.perf_counter(), Clock()
        dev = "cuda" if gpus > 1 else "cuda:0"  # cuda: every visible GPU
        run_sweep(recipe, Path(d) / "run", dev, clock, execution=dataclasses.replace(ex, device=dev))
        seconds = time.perf_counter() - t0
        df = load_trials(Path(d) / "run")
    # r["info"], not r.info: a row's .info is pandas' method
    walls = {
        r["key"]: (float(r["wall_time"]), r["info"].get("batched_with", 1) if isinstance(r["info"], dict) else 1)
        for _, r in df.iterrows()
    }
    return {"s": round(seconds, 1), "startup_s": round((clock.ready or t0) - t0, 1), "wall_and_batch": walls,
            "capture_fallbacks": clock.fallbacks, "failed": int((df["status"] == "failed").sum()),
            "metrics": {(r.regime, int(r["rank"]), float(r.lr)): float(r.metric)
                        for _, r in df.iterrows()}}  # fmt: skip


def cuda_context_s() -> float:
    t0 = time.perf_counter()
    torch.empty(1, device="cuda:0")
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def slot_starts(recipe) -> dict:
    """Seconds to a second slot's model on cuda:0: in a thread, after a first in the main thread; in a worker."""
    t0 = time.perf_counter()
    first = Trainer.load(recipe, "cuda:0")
    first_s, n_params = time.perf_counter() - t0, first.n_params
    made: list[Trainer] = []
    thread = threading.Thread(target=lambda: made.append(Trainer.load(recipe, "cuda:0")))
    t0 = time.perf_counter()
    thread.start()
    thread.join()
    thread_s = time.perf_counter() - t0
    made[0].close()  # the reverse of the order made (fused.py)
    first.close()
    ctx = torch.multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    t0 = time.perf_counter()
    p = ctx.Process(target=slot_process, args=(recipe, "cuda:0", True, True, tasks, results), daemon=True)
    p.start()
    while (message := results.get(timeout=300))[0] not in ("ready", "error"):
        pass
    process_s = time.perf_counter() - t0
    tasks.put(None)
    p.join(timeout=60)
    if message[0] == "error":
        sys.exit(f"the worker could not start: {message[2]}")
    return {
        "first_slot_s": round(first_s, 2),
        "thread_s": round(thread_s, 2),
        "process_s": round(process_s, 2),
        "params": n_params,
    }


def predict(durations: list[float], starts: list[float]) -> float:
    """When the last unit ends: units in queue order, each to the slot that is free first."""
    free = list(starts)
    for d in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += d
    return max(free)


def unit_seconds(recipe, walls: dict, slots: int, n_params: int) -> list[float] | None:
    """Each unit's seconds in the pool's queue order for `slots` slots, from the one-GPU run's trials (`walls`:
    key → (wall time, trials in its pass)); None if that run grouped its trials otherwise."""
    specs = grid_plan(recipe)
    k = min(trials_per_pass(Execution("cuda"), recipe, n_params), -(-len(specs) // slots))
    out = []
    for unit in units(specs, recipe, k):
        if any(walls[s.key][1] != len(unit) for s in unit):
            return None
        out.append(sum(walls[s.key][0] for s in unit))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="5m", choices=["5m", "124m"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/pool_start-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("pool_start")
    if not torch.cuda.is_available():
        sys.exit("pool_start.py needs a CUDA GPU")
    context = cuda_context_s()
    recipe = recipe_for(args.workload, args.steps)
    seed_cache(recipe)
    one = timed_sweep(recipe, 1, Execution("cuda:0", workers_per_gpu=1))  # one slot: the sweep as it ran
    starts = slot_starts(recipe)
    durations = unit_seconds(recipe, one["wall_and_batch"], 2, starts.pop("params"))
    shared = timed_sweep(recipe, 1, Execution("cuda:0", workers_per_gpu=2))
    report = {
        "workload": args.workload, "trials": len(grid_plan(recipe)), "steps": args.steps,
        "cuda_context_s": round(context, 2), **starts,
        "one_gpu_s": one["s"], "one_gpu_startup_s": one["startup_s"],
        "unit_s": [round(d, 1) for d in durations] if durations else None,
        "two_slots_on_one_gpu_s": shared["s"], "two_slots_failed": shared["failed"],
        "capture_fallbacks": {"one_slot": one["capture_fallbacks"], "two_slots": shared["capture_fallbacks"]},
        "two_slots_same_best_lrs": best_lrs(shared["metrics"]) == best_lrs(one["metrics"]),
    }  # fmt: skip
    if durations:
        tail = max(one["s"] - one["startup_s"] - sum(durations), 0.0)  # storing, closing: after the last unit
        first, thread_lag = one["startup_s"], starts["thread_s"] + context
        for how, lag in (("thread", thread_lag), ("process", starts["process_s"])):
            t = predict(durations, [first, first + lag]) + tail
            report[f"predicted_2gpu_{how}s_s"] = round(t, 1)
            report[f"predicted_scaling_{how}s"] = round(one["s"] / t, 2)
        longest_first = predict(sorted(durations, reverse=True), [first, first + thread_lag]) + tail
        report["predicted_scaling_threads_longest_first"] = round(one["s"] / longest_first, 2)
        report["predicted_scaling_no_start_cost"] = round(one["s"] / (predict(durations, [first] * 2) + tail), 2)
    print(json.dumps(report, indent=1), flush=True)
    rec.doc.update(report)
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
