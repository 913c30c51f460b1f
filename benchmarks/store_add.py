"""What storing one finished trial costs the sweep's main thread (sweep/store.py `TrialStore.add`: one Optuna
`add_trial` with the trial's loss curve as intermediate values), by how many curve points are kept. On a GPU
that thread shares the GIL with the slots' threads, so every millisecond here is one they may wait.

    python benchmarks/store_add.py [--trials 40] [--steps 100] [--points 500,50,25,1] [--data-files 1780]
                                   [--out FILE]

Each setting stores `--trials` trials of a `--steps`-step curve into a fresh SQLite store; prints ms per trial
and writes benchmarks/out/store_add-<UTC time>.json (benchmarks/record.py). `--data-files N` also times what
each trial's key and record ask of the recipe, with its data a local folder of N files (an image classifier's):
the data's identity worked out afresh (every call, before a recipe kept it) and as one recipe keeps it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import Recording  # noqa: E402

import mua_cli.sweep.trackers as trackers  # noqa: E402
from mua_cli.spec.trial import TrialResult, TrialSpec  # noqa: E402
from mua_cli.sweep.store import TrialStore  # noqa: E402


def ms_per_add(trials: int, steps: int, points: int) -> float:
    """Milliseconds per stored trial with at most `points` curve points kept as intermediate values."""
    old = trackers.MAX_CURVE_POINTS
    trackers.MAX_CURVE_POINTS = points
    try:
        with tempfile.TemporaryDirectory() as d:
            store = TrialStore.create(Path(d))
            t0 = time.perf_counter()
            for i in range(trials):
                spec = TrialSpec("B:1", 16, 2**-9 * (1 + i / 100), 0)
                curve = [2.0 + 0.01 * j for j in range(steps)]
                store.add(spec, TrialResult("ok", 2.0, curve, initial_loss=2.0, device="cpu"), {"steps": steps})
            return (time.perf_counter() - t0) / trials * 1000
    finally:
        trackers.MAX_CURVE_POINTS = old


def recipe_part_ms(files: int, calls: int) -> dict:
    """Milliseconds a call of `Recipe.outcome_fields()` (each trial key and stored record makes one or more)
    takes with the data a local folder of `files` small files, the hash cache warm: the data's identity worked
    out afresh (what every call did before a recipe kept it) and from one recipe, which keeps it."""
    from mua_cli.spec import data_identity as di
    from mua_cli.spec.recipe import Recipe

    with tempfile.TemporaryDirectory() as d, mock.patch.dict(os.environ, {"MUA_CACHE": str(Path(d) / "cache")}):
        folder = Path(d) / "images"  # the hash cache above is this call's: the user's is left alone
        for i in range(files):
            sub = folder / f"class{i % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:05d}.png").write_bytes(os.urandom(2048))
        recipe = Recipe.of(data=str(folder))
        recipe.outcome_fields()  # hashes every file once; later calls hit the cache
        t0 = time.perf_counter()
        for _ in range(calls):
            di.data_identity(str(folder))
        afresh = (time.perf_counter() - t0) / calls * 1000
        t0 = time.perf_counter()
        for _ in range(calls):
            recipe.outcome_fields()
        kept = (time.perf_counter() - t0) / calls * 1000
    return {"data_files": files, "calls": calls, "identity_afresh_ms": round(afresh, 2),
            "outcome_fields_kept_ms": round(kept, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--points", default="500,50,25,1", help="curve points kept, comma-separated")
    ap.add_argument("--data-files", type=int, default=0, help="also time the recipe's part with a data folder "
                    "of this many files (0: not)")  # fmt: skip
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/store_add-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("store_add")
    rec.set("settings", {"trials": args.trials, "steps": args.steps, "shipped_points": trackers.MAX_CURVE_POINTS})
    print(rec.header(), flush=True)
    for points in (int(p) for p in args.points.split(",")):
        ms = ms_per_add(args.trials, args.steps, points)
        rec.add("rows", {"points": points, "ms_per_trial": round(ms, 1)})
        print(f"at most {points:>4} points: {ms:6.1f} ms a trial", flush=True)
    if args.data_files:
        row = recipe_part_ms(args.data_files, 10)
        rec.set("recipe_part", row)
        print(f"a data folder of {args.data_files} files: its identity afresh {row['identity_afresh_ms']:.1f} ms a "
              f"call; outcome_fields from one recipe {row['outcome_fields_kept_ms']:.3f} ms", flush=True)  # fmt: skip
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
