"""What the first run of `make run` costs on a small CPU machine, part by part, old settings against new, measured
in one run, back to back (issue 14, section 3). Prints a table and writes benchmarks/out/first_run-<UTC time>.json
(or --out; benchmarks/record.py: with the commit, the machine and the library versions).

    python benchmarks/first_run.py [--repeats 2] [--parts trial,profile,pool,start] [--pretrain] [--out FILE]
    python benchmarks/first_run.py --parts sweeps

The machine's cores may be shared with other programs, so every variant is measured in turns with the others,
`--repeats` times, and CPU seconds (this process and its children, from getrusage) are given beside wall seconds:
a CPU second of a one-thread process is a second of work wherever the other programs are.

1. trial: one trial of recipes/tiny.yaml (100 steps of batch 8 × 64, width 128) on four (regime, rank, LR), in
   this process with torch's threads at 2 (torch's default on 2 cores: the old default) and at 1. Also whether
   the results differ (they should not: the same arithmetic, summed in the same order).
2. where a trial's time goes, at one thread: cProfile of one trial (forward, backward, AdamW, clipping,
   batches, loss readback, evaluation). cProfile slows Python: the shares are rough.
3. pool: the same 12 trials through mua's executor in a fresh process: one slot of 2 threads (`--workers-per-gpu
   1`, the old default) against two slots of one thread each, this process and a worker process (the new
   default on 2 cores); wall and CPU seconds for the whole process, the worker's start included.
4. start: a worker process's start alone (Python, torch, transformers, peft and the model), and the embedded
   model loaded from the weights shipped in the package against pretraining it (600 steps, one thread).
6. cpu: where a trial's CPU time goes by kernel, and the heap setting. In fresh processes, alternately, one
   trial (B:1, ranks 16 and 64) at one thread with and without `keep_freed_memory` (sweep/sizing.py): wall
   seconds, minor page faults, and whether the metric is the same to the last bit; torch.profiler's share of
   the trial's CPU time in matrix multiplies (aten::mm, addmm, bmm and their in-place forms); and the rate one
   thread reaches on the trial's largest GEMM ([512, 128] × [128, 344], the MLP's) alone.
7. workers: a CPU worker process from its start to its model loaded, spawned against forked by the forkserver
   `mua sweep` starts (sweep/pool.py), alternately, `--repeats` times.
5. sweeps: the default `mua sweep` end to end in a fresh folder (the embedded model loaded, not pretrained), old
   (`--lrs 2^-11:2^-4 --workers-per-gpu 1`) and new (the recipe's grid and slots), and the old at one thread;
   trials run, wall and CPU seconds, and `mua fit --json` of each.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from record import Recording  # noqa: E402

MUA = str(Path(sys.executable).with_name("mua"))
TRIALS = [("A:r", 4, 2**-5), ("A:r", 64, 2**-5), ("B:1", 16, 2**-7), ("B:1", 64, 2**-8)]


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def trials_in_process(repeats: int) -> dict:
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.grid import make_spec
    from mua_cli.sweep.trainer import Trainer

    recipe = load_recipe("tiny")
    runner = Trainer.load(recipe, "cpu")
    specs = [make_spec(recipe, reg, rank, lr, 0) for reg, rank, lr in TRIALS]
    runner.run(specs[0])  # warm-up: first-call costs are no trial's
    rows, metrics = [], {}
    for rep in range(repeats):
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for spec in specs:
                load, w0, c0 = load_avg(), time.perf_counter(), time.process_time()
                result = runner.run(spec)
                rows.append({"threads": threads, "repeat": rep, "trial": f"{spec.regime} r={spec.rank}",
                             "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                             "load_avg": load, "status": result.status})  # fmt: skip
                metrics.setdefault(spec.key, {})[threads] = (result.metric, result.eval_loss)
                print("  trial", json.dumps(rows[-1]), flush=True)
    torch.set_num_threads(2)
    out = {"rows": rows, "same_results": all(len(set(v.values())) == 1 for v in metrics.values())}
    for threads in (2, 1):
        mine = [r for r in rows if r["threads"] == threads]
        out[f"threads_{threads}"] = {
            "wall_s_per_trial": sum(r["wall_s"] for r in mine) / len(mine),
            "cpu_s_per_trial": sum(r["cpu_s"] for r in mine) / len(mine),
        }
    return out


def profile_trial() -> dict:
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.grid import make_spec
    from mua_cli.sweep.trainer import Trainer

    torch.set_num_threads(1)
    recipe = load_recipe("tiny")
    runner = Trainer.load(recipe, "cpu")
    spec = make_spec(recipe, "A:r", 16, 2**-6, 0)
    runner.run(spec)
    prof = cProfile.Profile()
    prof.enable()
    runner.run(spec)
    prof.disable()
    torch.set_num_threads(2)
    stats = pstats.Stats(prof).stats
    total = max(ct for (_, _, _), (_, _, _, ct, _) in stats.items())

    def cum(file_part: str, name: str) -> float:
        return sum(ct for (f, _, n), (_, _, _, ct, _) in stats.items() if n == name and file_part in f)

    parts = {
        "forward (loss)": cum("mua_cli/train/tasks.py", "loss"),
        "backward": cum("torch/_tensor.py", "backward"),
        "AdamW step": cum("torch/optim/adam.py", "step"),
        "gradient clipping": cum("torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
        "evaluation": cum("mua_cli/train/loop.py", "evaluate_task"),
        "adapters made (peft)": cum("mua_cli/train/adapters.py", "prepare"),
        "batches (windows)": cum("mua_cli/train/data.py", "windows"),
        "loss readback (tolist)": sum(ct for (_, _, n), (_, _, _, ct, _) in stats.items() if "'tolist'" in n),
    }  # fmt: skip
    return {"trial_s_under_cprofile": total, "shares": {k: round(v / total, 3) for k, v in parts.items()}}


POOL_RECIPE = {"ranks": "4,64", "regimes": "A:r,B:1", "lrs": "2^-8:2^-6", "refine": 0, "max_extend": 0}


def pool_child(workers: int, out_dir: str) -> None:
    """In a fresh process: 12 trials of the tiny recipe through run_sweep with `workers` slots on the CPU."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.sizing import Execution
    from mua_cli.sweep.stream import run_sweep

    recipe = load_recipe("tiny", **POOL_RECIPE)
    summary = run_sweep(recipe, Path(out_dir), "cpu", execution=Execution("cpu", workers_per_gpu=workers))
    print(json.dumps({"wall_s": time.perf_counter() - w0, "cpu_s": cpu_seconds() - c0, "trials": summary.ran}))


def pool(repeats: int) -> dict:
    rows = []
    for rep in range(repeats):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                load = load_avg()
                args = [sys.executable, __file__, "--child-pool", str(workers), str(Path(tmp) / "run")]
                res = subprocess.run(args, capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(
                    {"slots": workers, "threads_per_slot": 2 // workers, "repeat": rep, "load_avg": load, **row}
                )
                print("  pool", json.dumps(rows[-1]), flush=True)
    out: dict = {"rows": rows}
    for workers in (1, 2):
        mine = [r for r in rows if r["slots"] == workers]
        wall = sum(r["wall_s"] for r in mine) / len(mine)
        out[f"slots_{workers}"] = {
            "wall_s": wall,
            "cpu_s": sum(r["cpu_s"] for r in mine) / len(mine),
            "trials_per_hour": 3600 * mine[0]["trials"] / wall,
        }
    out["speedup"] = out["slots_1"]["wall_s"] / out["slots_2"]["wall_s"]
    return out


def start_costs(pretrain_too: bool) -> dict:
    out = {}
    code = "import torch; from mua_cli.spec.recipe import load_recipe; from mua_cli.sweep.trainer import Trainer; " \
           "Trainer.load(load_recipe('tiny'), 'cpu')"  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for _ in range(2):
        w0, c0 = time.perf_counter(), cpu_seconds()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
        rows.append({"wall_s": time.perf_counter() - w0, "cpu_s": cpu_seconds() - c0})
    out["worker_start"] = {"rows": rows, "cpu_s": min(r["cpu_s"] for r in rows)}

    from mua_cli.spec.recipe import load_recipe
    from mua_cli.train.data import load_text_data
    from mua_cli.train.models import PRETRAIN_DEFAULTS, embedded_config, load_embedded, pretrain, shipped_folder

    recipe = load_recipe("tiny")
    out["shipped"] = str(shipped_folder(recipe.model, recipe.data.seq_len))
    w0, c0 = time.perf_counter(), time.process_time()
    load_embedded(recipe.model, recipe.data.seq_len)
    out["load_shipped"] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    if pretrain_too:
        torch.set_num_threads(1)
        pre = {**PRETRAIN_DEFAULTS, **recipe.model.pretrain}
        w0, c0 = time.perf_counter(), time.process_time()
        pretrain(embedded_config(recipe.model), load_text_data(pre["data"], recipe.data.seq_len, 0.0), pre)
        out["pretrain_1_thread"] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        torch.set_num_threads(2)
    return out


def worker_starts(repeats: int) -> dict:
    """Seconds from a CPU worker process's start to its model loaded (pool.slot_process's "ready"), alternately
    spawned (a fresh interpreter importing torch, transformers and peft) and forked by the forkserver that `mua
    sweep` starts at its beginning (forkserver.process_context), the server's own start not counted."""
    import torch.multiprocessing as mp

    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.forkserver import process_context, start_process_server
    from mua_cli.sweep.pool import slot_process

    recipe = load_recipe("tiny")

    def ready_s(ctx) -> float:
        tasks, results = ctx.Queue(), ctx.Queue()
        w0 = time.perf_counter()
        p = ctx.Process(target=slot_process, args=(recipe, "cpu", False, False, tasks, results, 1), daemon=True)
        p.start()
        while (message := results.get(timeout=600))[0] == "note":  # what loading the workload says
            pass
        wall = time.perf_counter() - w0
        tasks.put(None)
        p.join(timeout=60)
        if message[0] != "ready":
            raise RuntimeError(f"the worker did not start: {message}")
        return wall

    start_process_server()
    w0 = time.perf_counter()
    server_and_first = ready_s(process_context("cpu"))
    rows = [{"spawn_s": ready_s(mp.get_context("spawn")), "forkserver_s": ready_s(process_context("cpu"))}
            for _ in range(repeats)]  # fmt: skip
    return {
        "rows": rows,
        "server_start_and_first_worker_s": server_and_first,
        "measured_s": time.perf_counter() - w0,
        "spawn_s": min(r["spawn_s"] for r in rows),
        "forkserver_s": min(r["forkserver_s"] for r in rows),
    }


def sweeps() -> dict:
    """The default sweep, old settings (the old grid, one slot of torch's 2 threads) then new, back to back; and
    the old grid at one thread, whose CPU seconds are a second of work each wherever other programs run (at 2
    threads the old slot slows many-fold whenever another program takes a core, and then measures that program)."""
    out = {}
    old = ["--lrs", "2^-11:2^-4", "--workers-per-gpu", "1"]
    variants = {"old": (old, {}), "new": ([], {}), "old grid, one thread": (old, {"OMP_NUM_THREADS": "1"})}
    for name, (extra, env) in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            load, w0, c0 = load_avg(), time.perf_counter(), cpu_seconds()
            cmd = [MUA, "sweep", "--out", str(run), "--quiet", *extra]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env})
            wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
            fit = subprocess.run([MUA, "fit", str(run), "--json", "--no-plot"], check=True, capture_output=True)
            doc = json.loads(fit.stdout)
            out[name] = {"args": extra, "env": env, "wall_s": wall, "cpu_s": cpu, "load_avg": [load, load_avg()],
                         "trials": doc["n_trials"], "fit": summarize_fit(doc)}  # fmt: skip
            print("  sweep", name, json.dumps({k: v for k, v in out[name].items() if k != "fit"}), flush=True)
    return out


def cpu_child(mode: str) -> None:
    """In a fresh process: one trial per rank at one thread, the heap setting `mode` (on/off); prints JSON."""
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.grid import make_spec
    from mua_cli.sweep.sizing import keep_freed_memory
    from mua_cli.sweep.trainer import Trainer

    if mode == "on":
        keep_freed_memory()
    torch.set_num_threads(1)
    recipe = load_recipe("tiny")
    runner = Trainer.load(recipe, "cpu")
    out = {}
    for rank in (16, 64):
        spec = make_spec(recipe, "B:1", rank, 2**-7, 0)
        runner.run(spec)  # warm
        f0, w0 = _faults(), time.perf_counter()
        result = runner.run(spec)
        out[rank] = {"wall_s": time.perf_counter() - w0, "faults": _faults() - f0, "metric": repr(result.metric)}
    if mode == "on":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runner.run(make_spec(recipe, "B:1", 16, 2**-7, 0))
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        gemm = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
        out["gemm_share"] = sum(e.self_cpu_time_total for e in events if e.key in gemm) / total
        a, w = torch.randn(512, 128), torch.randn(344, 128)
        for _ in range(20):
            torch.nn.functional.linear(a, w)
        t0 = time.perf_counter()
        for _ in range(500):
            torch.nn.functional.linear(a, w)
        out["gemm_gflops_one_thread"] = 2 * 512 * 128 * 344 * 500 / (time.perf_counter() - t0) / 1e9
    print(json.dumps(out))


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_kernels(repeats: int) -> dict:
    runs: dict[str, list] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            cmd = [sys.executable, __file__, "--child-cpu", mode]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {"runs": runs}
    for mode, rs in runs.items():
        out[mode] = {rank: {k: sum(r[rank][k] for r in rs) / len(rs) for k in ("wall_s", "faults")}
                     for rank in ("16", "64")}  # fmt: skip
    out["same_metrics"] = all(r[k]["metric"] == runs["off"][0][k]["metric"] for r in runs["off"] + runs["on"]
                              for k in ("16", "64"))  # fmt: skip
    out["gemm_share"] = sum(r["gemm_share"] for r in runs["on"]) / repeats
    out["gemm_gflops_one_thread"] = sum(r["gemm_gflops_one_thread"] for r in runs["on"]) / repeats
    return out


def summarize_fit(doc: dict) -> dict:
    import math

    return {
        "regimes": {n: {"slope": r["slope"], "slope_interval": r["slope_interval"], "shrunk_slope": r["shrunk_slope"]}
                    for n, r in doc["regimes"].items()},
        "optima": [{"regime": o["regime"], "rank": o["rank"], "log2_lr_star": round(math.log2(o["lr_star"]), 2),
                    "log2_interval": [round(math.log2(o["lo"]), 2), round(math.log2(o["hi"]), 2)]}
                   for o in doc["optima"] if o.get("lr_star")],
        "noise_sd": doc["noise_sd"],
    }  # fmt: skip


PARTS = ("trial", "profile", "pool", "start", "workers", "sweeps", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", default="trial,profile,pool,start", help=f"any of {','.join(PARTS)}")
    ap.add_argument("--pretrain", action="store_true", help="start: also time pretraining the embedded model")
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/first_run-<UTC time>.json)")
    ap.add_argument("--child-pool", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_pool:
        pool_child(int(args.child_pool[0]), args.child_pool[1])
        return
    if args.child_cpu:
        cpu_child(args.child_cpu)
        return
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    torch.set_num_threads(2)
    rec = Recording("first_run")
    doc = rec.doc
    doc["load_avg_at_start"] = os.getloadavg()
    run = {
        "trial": lambda: trials_in_process(args.repeats),
        "profile": profile_trial,
        "pool": lambda: pool(args.repeats),
        "start": lambda: start_costs(args.pretrain),
        "workers": lambda: worker_starts(args.repeats),
        "sweeps": sweeps,
        "cpu": lambda: cpu_kernels(args.repeats),
    }
    for part in parts:
        doc[part] = run[part]()
        doc["load_avg_at_end"] = os.getloadavg()
        path = rec.save(args.out)  # what is measured so far
        REPORTS[part](doc[part])
    print(f"wrote {path}")


def report_trial(t: dict) -> None:
    print("one trial in this process (mean over trials and repeats):")
    for n in (2, 1):
        r = t[f"threads_{n}"]
        print(f"  {n} thread(s): {r['wall_s_per_trial']:.2f} s wall, {r['cpu_s_per_trial']:.2f} s CPU")
    print(f"  same results at 1 and 2 threads: {t['same_results']}", flush=True)


def report_profile(p: dict) -> None:
    print(f"where one trial's time goes (cProfile, 1 thread, {p['trial_s_under_cprofile']:.1f} s): {p['shares']}")


def report_pool(p: dict) -> None:
    print("12 trials through the executor, a fresh process each (mean over repeats):")
    for n in (1, 2):
        r = p[f"slots_{n}"]
        print(f"  {n} slot(s) × {2 // n} thread(s): {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, "
              f"{r['trials_per_hour']:.0f} trials/hour")  # fmt: skip
    print(f"  speedup of 2 × 1 over 1 × 2: {p['speedup']:.2f}×", flush=True)


def report_start(s: dict) -> None:
    w = s["worker_start"]
    print(f"worker process start: {w['cpu_s']:.1f} s CPU; shipped weights loaded in "
          f"{s['load_shipped']['wall_s']:.2f} s ({s['shipped']})")  # fmt: skip
    if "pretrain_1_thread" in s:
        r = s["pretrain_1_thread"]
        print(f"pretraining instead: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU", flush=True)


def report_workers(w: dict) -> None:
    print(f"a CPU worker from its start to its model loaded (best of {len(w['rows'])}): spawned {w['spawn_s']:.2f} s, "
          f"forked by the running forkserver {w['forkserver_s']:.2f} s (the server's start and first worker: "
          f"{w['server_start_and_first_worker_s']:.2f} s)", flush=True)  # fmt: skip


def report_sweeps(doc: dict) -> None:
    for name, r in doc.items():
        print(f"default sweep, {name} {r['args']}: {r['trials']} trials, {r['wall_s']:.0f} s wall, "
              f"{r['cpu_s']:.0f} s CPU")  # fmt: skip
        print(f"  fit: {json.dumps(r['fit'])}", flush=True)


def report_cpu(c: dict) -> None:
    print("one trial at one thread, a fresh process each (mean over repeats), glibc keeping freed memory or not:")
    for rank in ("16", "64"):
        off, on = c["off"][rank], c["on"][rank]
        print(f"  rank {rank}: {off['wall_s']:.2f} s, {off['faults']:.0f} page faults by default; "
              f"{on['wall_s']:.2f} s, {on['faults']:.0f} kept ({off['wall_s'] / on['wall_s']:.3f}×)")  # fmt: skip
    print(f"  same metrics to the last bit: {c['same_metrics']}")
    print(f"  matrix multiplies: {c['gemm_share']:.0%} of a trial's CPU time (torch.profiler); the MLP's GEMM alone "
          f"runs at {c['gemm_gflops_one_thread']:.0f} GFLOP/s on one thread", flush=True)  # fmt: skip


REPORTS = {"trial": report_trial, "profile": report_profile, "pool": report_pool, "start": report_start,
           "workers": report_workers, "sweeps": report_sweeps, "cpu": report_cpu}  # fmt: skip


if __name__ == "__main__":
    main()
