"""mua against a plain serial peft loop, as a user runs each, on exactly the same trials, in one run.

    python benchmarks/gpu_speed.py [--only 5m,124m,350m,minilm-text,vit-base] [--steps 100] [--device cuda:0]
        [--workers-per-gpu N] [--batch-trials N] [--no-cuda-graphs] [--no-fused-kernels] [--diag [--no-sweeps]]
        [--out FILE]
    python benchmarks/gpu_speed.py --scaling [--only 5m,124m] [--steps 300]   # mua on 1, 2, 4 … N GPUs
    python benchmarks/gpu_speed.py --smoke                 # tiny shapes on the CPU: the harness end to end
    python benchmarks/gpu_speed.py --table FILE.json [FILE.json ...]     # docs/performance.md's tables (a file: a
                                                                        # report, or a list of reports)
    MUA_BENCH_PROFILE=DIR python benchmarks/gpu_speed.py ...   # each `mua sweep` under cProfile, into DIR

Each run writes one JSON file, benchmarks/out/gpu_speed-<UTC time>.json (or --out; benchmarks/record.py: the
commit, the machine, the library versions and the command line go in with the numbers), rewritten after every
workload, and prints a short table at the end.

The race, per workload (5m, 124m, minilm, minilm-text, vit-base):
1. mua, as a user runs it: `mua sweep --recipe R --out RUN`, then `mua fit RUN`, then `mua transfer RUN --to
   full-ft --json`, each a fresh process. **Time to answer**: from the sweep command's start to the transfer's
   value. Trials per hour: the trials the sweep stored over the sweep command's seconds.
2. plain, the loop one writes by hand, as a fresh process too (benchmarks/plain_loop.py, which imports what
   such a loop needs and no more): the trials mua ran, read back from the run's store here
   (`mua_cli.api.load_trials`: the same regimes, ranks, LRs, seeds, steps and batch; failed and retried ones
   counted once, as stored), are handed to it, and it runs each, one after another: a copy of the fp32
   base, peft `get_peft_model` with μA's init (as mua sets it), a classifier's head in modules_to_save at
   head_lr, torch AdamW (foreach), LambdaLR warmup + cosine as the recipe says, bf16 autocast on a GPU, gradient
   clipping, `loss.item()` every step, the same divergence stop and the held-out evaluation where the recipe has
   one. Its trials per hour: the same trials over its command's seconds; its time to answer: those seconds plus
   the seconds mua's fit and transfer took (the same commands would answer from its trials).
3. The sweep's timeline (benchmarks/sweep_timeline.py): each device busy and idle, by phase, from the store.
4. Science check: per (regime, rank), the best LR (mean over seeds) of mua's trials against the plain loop's.
Before the first race one throwaway process imports torch, transformers, peft, optuna and mua (recorded as
`primed_imports_s`), so that both sides find those files in the OS's cache: on a fresh machine the first command
reads them from disk, and that would be mua's sweep alone, as it runs first.

Workloads, all with random weights (step time does not depend on them; the hubs are out of reach):
- 5m, 124m: Llama-shaped causal LMs of about 5M and 120M parameters (MLP widths multiples of 256), byte-level,
  windows of the embedded Britannica corpus, batch 16 × 512 tokens. 5m: the default grid (A:r and B:1, ranks 4,
  16, 64, LRs 2^-12 … 2^-5, and what the adaptive sweep adds); 124m: B:1, rank 16, 8 LRs.
- minilm, minilm-text, vit-base: benchmarks/cls_speed.py's classifiers: a MiniLM-shaped BERT on sentences of
  random words (minilm) and on real text of 64-128 tokens, the standard library's docstrings in 10 classes
  (minilm-text); a ViT-Base/16 on tinted noise images (vit-base). B:1, 8 LRs, rank 8 (minilm-text: 16).
- 350m: no race: one LoRA trial (rank 16) of a ~365M Llama, plain loop against mua's trial in this process:
  ms per step and the share of the bf16 peak (MFU). FLOPs per step = 4·N·T (forward, and backward to the
  activations; the frozen weights get no gradient) + 12·layers·d·seq·T (attention, fwd + bwd, PaLM's count),
  N = the matmul weights, T = tokens per step; LoRA's own FLOPs (< 1 %) left out. The share is of the
  datasheet's 989 TFLOP/s dense bf16 and of an 8192³ bf16 matmul measured in the same run. The floor: the
  step's matrix multiplies and attention alone, timed as CUDA graph replays (step_floor).
- --scaling: mua's race half only (sweep, fit, transfer) on the first 1, 2, 4 … and all visible GPUs, in turn
  (with --smoke: 1 and 2 slots on the CPU, the harness alone).
- --diag (last, so that its runs do not warm the races' kernels): ms per trial-step in one process, eager and
  graphed, fused and not, for K = 1…16 trials per pass, and the 350M trial torch.compile'd (an experiment).
- --smoke: every workload at a tiny shape (width 32, one layer), 4 steps, 3 LRs, one rank, on the CPU unless
  --device says otherwise: the whole harness in a minute or two (tests/test_benchmark_recipes.py runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plain_loop import plain_trial  # noqa: E402
from record import Recording, table  # noqa: E402
from sweep_timeline import timeline  # noqa: E402

from mua_cli.api import Recipe, load_trials  # noqa: E402
from mua_cli.spec.trial import TrialSpec  # noqa: E402
from mua_cli.train.loop import run_trial  # noqa: E402
from mua_cli.train.models import embedded_config, embedded_folder  # noqa: E402
from mua_cli.train.workload import load_workload  # noqa: E402

MUA = [sys.executable, "-c", "from mua_cli.ui.cli import main; main()"]  # `mua`, wherever mua_cli is importable
DATASHEET_BF16 = 989e12
# Llama-shaped, byte vocabulary. Widths are multiples of 256, as in real models: a bf16 GEMM of width 3500 (the
# first version of this table) ran 3.2x slower than one of 3584 on the H200 (benchmarks/gpu_profile.py).
SHAPES = {
    "5m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4),
    "124m": dict(hidden_size=768, intermediate_size=3328, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16),
}
SWEEPS = {  # the trials each workload's grid holds: regimes × ranks × LRs, one seed; 5m: the embedded default's
    "5m": dict(regimes="A:r,B:1", ranks="4,16,64", lrs="2^-12:2^-5"),
    "124m": dict(regimes="B:1", ranks="16", lrs="2^-12:2^-5"),
    "350m": dict(regimes="B:1", ranks="16", lrs="2^-10:2^-8"),
}
SMOKE_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
# 3 trials, the least a grid holds; at 4 steps the optimum sits near 2^-1 (2^-4 … 2^-1 and 2^-1 … 2^3 had it at an edge)
SMOKE_SWEEP = dict(regimes="B:1", ranks="4", lrs="2^-2:2^0", refine=0)
CLASSIFIERS = {"minilm": "8", "minilm-text": "16", "vit-base": "8"}  # benchmarks/cls_speed.py's, and their ranks
RACES = ("5m", "124m", *CLASSIFIERS)
DEFAULT = "5m,124m,350m,minilm-text,vit-base"


def recipe_for(name: str, steps: int, smoke: bool = False) -> Recipe:
    """A causal LM workload's recipe (5m, 124m, 350m); `smoke`: the tiny shape and grid."""
    shape = SMOKE_SHAPE if smoke else SHAPES[name]
    shape = {**shape, "num_key_value_heads": shape["num_attention_heads"], "max_position_embeddings": 1024}
    return Recipe.of(
        name=f"bench-{name}", model="embedded:tiny", model_config=shape,
        pretrain={"steps": 1, "data": "embedded:shakespeare"},  # never run: seed_cache puts a model where it goes
        data="embedded:britannica", seq_len=64 if smoke else 512, batch_size=4 if smoke else 16, steps=steps,
        eval_fraction=0.0, dtype="bfloat16", max_extend=0, **(SMOKE_SWEEP if smoke else SWEEPS[name]),
    )  # fmt: skip


def seed_cache(recipe: Recipe) -> None:
    """A random-init model of the recipe's shape, where mua looks for its pretrained model (no pretraining)."""
    from transformers import LlamaForCausalLM

    folder = embedded_folder(recipe.model, recipe.data.seq_len)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(embedded_config(recipe.model)).save_pretrained(folder)


def workload(name: str, steps: int, smoke: bool, folder: Path) -> tuple[Recipe, dict]:
    """The race's recipe, its model and data made (in `folder` for the classifiers), and what describes them."""
    if name in SHAPES:
        recipe = recipe_for(name, steps, smoke)
        seed_cache(recipe)
        return recipe, {}
    import cls_speed

    model, data = cls_speed.WORKLOADS[name][0](folder, 16 * steps + 200, smoke)
    recipe = cls_speed.recipe_for(name, model, data, steps, "4" if smoke else CLASSIFIERS[name])
    if smoke:
        recipe = recipe.replace(lrs=SMOKE_SWEEP["lrs"])
    return recipe, cls_speed.text_stats(model, data) if name == "minilm-text" else {}


def command(args: list[str], env: dict | None = None) -> dict:
    """Runs a command to its end; its start and end (epoch seconds), exit code, and output lines, each with the
    time it arrived (the child's output unbuffered), for the timeline."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    t0 = time.time()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = [(time.time(), line.rstrip()) for line in p.stdout]
    rc = p.wait()
    return {"start": t0, "end": time.time(), "rc": rc, "lines": lines}


def failure(what: str, run: dict) -> str:
    tail = [text for _, text in run["lines"] if text.strip()][-6:]
    return f"{what} exited {run['rc']}: " + " | ".join(tail)


def profiled(name: str) -> list[str]:
    """`mua`, or with MUA_BENCH_PROFILE=DIR `mua` under cProfile, the stats written to DIR/<name>.prof as the
    command exits: the main thread (start-up, planning, storing), and on Python 3.12 and later every thread, the
    GPU slots' too, whose Python it slows: a profile of where time goes, not a timing."""
    folder = os.environ.get("MUA_BENCH_PROFILE")
    if not folder:
        return MUA
    Path(folder).mkdir(parents=True, exist_ok=True)
    stats = str(Path(folder) / f"{name}.prof")
    code = ("import atexit, cProfile; p = cProfile.Profile(); "
            f"atexit.register(lambda: (p.disable(), p.dump_stats({stats!r}))); p.enable(); "
            "from mua_cli.ui.cli import main; main()")  # fmt: skip
    return [sys.executable, "-c", code]


def save_lines(name: str, run: dict) -> None:
    """With MUA_BENCH_PROFILE=DIR, a command's output lines, each with its seconds from the command's start."""
    if folder := os.environ.get("MUA_BENCH_PROFILE"):
        text = "".join(f"{t - run['start']:8.2f}  {line}\n" for t, line in run["lines"])
        (Path(folder) / f"{name}.lines.txt").write_text(text)


BROKEN_GPU = "This process cannot use the GPU any more"  # sweep/trainer.py's stop after a CUDA error of that kind


def mua_answer(recipe_file: Path, run: Path, device: str, flags: list[str], env: dict | None = None) -> dict:
    """`mua sweep`, `mua fit`, `mua transfer --to full-ft`, one after another, timed as a user sees them."""
    name = f"sweep-{run.parent.name}-{run.name}"
    args = [*profiled(name), "sweep", "--recipe", str(recipe_file), "--out", str(run), "--device", device, *flags]
    sweep, resumed = command(args, env), []
    if sweep["rc"] != 0 and any(BROKEN_GPU in text for _, text in sweep["lines"]):
        # as its message asks, and as a user would: the same command again, timed from the first one's start
        resumed.append(failure("mua sweep", sweep))
        again = command(args, env)
        sweep = {**again, "start": sweep["start"], "lines": sweep["lines"] + again["lines"]}
    save_lines(name, sweep)
    if sweep["rc"] != 0:
        raise RuntimeError(failure("mua sweep", sweep))
    fit = command([*MUA, "fit", str(run)], env)
    transfer = command([*MUA, "transfer", str(run), "--to", "full-ft", "--json"], env)
    out = {"sweep": sweep, "sweep_s": round(sweep["end"] - sweep["start"], 2),
           "fit_s": round(fit["end"] - fit["start"], 2), "transfer_s": round(transfer["end"] - transfer["start"], 2),
           "answer_s": round(transfer["end"] - sweep["start"], 2), "answer_lr": None, "answer_error": None,
           "resumed": resumed}  # fmt: skip
    if fit["rc"] != 0:
        out["answer_error"] = failure("mua fit", fit)
    elif transfer["rc"] != 0:
        out["answer_error"] = failure("mua transfer", transfer)
    else:
        doc = json.loads(next(text for _, text in reversed(transfer["lines"]) if text.startswith("{")))
        out["answer_lr"], out["answer_basis"] = doc["lr"], doc.get("basis")
    return out


def failed_errors(df) -> dict[str, int]:
    """Each distinct error of mua's failed trials (its first line, cut short), with how many trials had it."""
    if "error" not in df:
        return {}
    errors = df.loc[df["status"] == "failed", "error"].dropna().astype(str)
    return errors.map(lambda e: e.splitlines()[0][:200] if e else "").value_counts().to_dict()


def mean_by_lr(rows) -> dict:
    """(regime, rank) → LR → the mean metric over seeds (inf: some seed diverged; failed trials left out)."""
    out: dict = {}
    for regime, rank, lr, _seed, metric in rows:
        if metric is None or (isinstance(metric, float) and math.isnan(metric)):
            continue
        out.setdefault(f"{regime} r={rank}", {}).setdefault(lr, []).append(metric)
    return {g: {lr: sum(v) / len(v) for lr, v in by.items()} for g, by in out.items()}


def by_lr(rows) -> dict:
    """mean_by_lr for JSON: so that best LRs that differ can be judged (a flat top, or noise, or a real gap)."""
    return {g: {f"{lr:.6g}": round(m, 5) if math.isfinite(m) else None for lr, m in sorted(by.items())}
            for g, by in mean_by_lr(rows).items()}  # fmt: skip


def best_lrs(rows) -> dict:
    best = {}
    for group, by in mean_by_lr(rows).items():
        finite = {lr: m for lr, m in by.items() if math.isfinite(m)}
        best[group] = min(finite, key=finite.get) if finite else None
    return best


def race(name: str, steps: int, device: str, smoke: bool, flags: list[str]) -> dict:
    """mua's time to answer and trials per hour against the plain loop's, on the trials mua ran."""
    with tempfile.TemporaryDirectory(prefix=f"mua-bench-{name}-") as d:
        folder = Path(d)
        recipe, about = workload(name, steps, smoke, folder)
        recipe_file = folder / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        run = folder / "run"
        mua = mua_answer(recipe_file, run, device, flags)
        df = load_trials(run).sort_values("number")
        for col, want in (("steps", recipe.optim.steps), ("batch_size", recipe.optim.batch_size)):
            if col in df and set(df[col].dropna().astype(int)) - {want}:
                raise RuntimeError(f"the store's trials ran other {col} than the recipe's {want}")
        specs, plain_out = folder / "trials.json", folder / "plain.json"
        specs.write_text(json.dumps([[r["regime"], int(r["rank"]), float(r["lr"]), int(r["seed"])]
                                     for _, r in df.iterrows()]))  # fmt: skip
        loop = ROOT / "benchmarks" / "plain_loop.py"
        plain_cmd = command([sys.executable, str(loop), "--trials", str(specs), "--recipe-file", str(recipe_file),
                             "--device", device, "--out", str(plain_out)])  # fmt: skip
        if plain_cmd["rc"] != 0:
            raise RuntimeError(failure("the plain loop", plain_cmd))
        plain = json.loads(plain_out.read_text())
        sweep = mua["sweep"]
        tl = timeline(run, sweep["start"], sweep["end"], sweep["start"] + mua["answer_s"], lines=sweep["lines"])
    trials = len(df)
    plain_s = round(plain_cmd["end"] - plain_cmd["start"], 2)
    plain_answer = round(plain_s + mua["fit_s"] + mua["transfer_s"], 2)
    mua_rows = [(r["regime"], int(r["rank"]), float(r["lr"]), int(r["seed"]), float(r["metric"]))
                for _, r in df.iterrows()]  # fmt: skip
    bm, bp = best_lrs(mua_rows), best_lrs(plain["trials"])
    within = all(bm.get(g) and v and abs(math.log2(bm[g] / v)) <= 1 for g, v in bp.items())
    infos = [i for i in df["info"] if isinstance(i, dict)] if "info" in df else []
    startup = phase_seconds(tl, "start-up")
    return {
        "workload": name, "params_M": plain["params_M"], "trials": trials, "steps": recipe.optim.steps,
        "batch": recipe.optim.batch_size, "seq_len": recipe.data.seq_len,
        "grid": {k: recipe.to_dict()[k] for k in ("regimes", "ranks", "lrs", "seeds", "refine")},
        "mua_sweep_s": mua["sweep_s"], "mua_fit_s": mua["fit_s"], "mua_transfer_s": mua["transfer_s"],
        "mua_answer_s": mua["answer_s"], "mua_startup_s": startup, "answer_lr": mua["answer_lr"],
        "answer_basis": mua.get("answer_basis"), "answer_error": mua["answer_error"],
        "plain_s": plain_s, "plain_load_s": plain["load_s"], "plain_trials_s": plain["trials_s"],
        "plain_answer_s": plain_answer, "plain_peak_gib": plain["peak_gib"],
        "mua_trials_per_h": round(trials * 3600 / mua["sweep_s"]), "plain_trials_per_h": round(trials * 3600 / plain_s),
        "x_trials_per_h": round(plain_s / mua["sweep_s"], 2), "x_answer": round(plain_answer / mua["answer_s"], 2),
        "failed": int((df["status"] == "failed").sum()), "errors": failed_errors(df), "mua_resumed": mua["resumed"],
        "diverged_mua": int((df["status"] == "diverged").sum()),
        "diverged_plain": sum(1 for t in plain["trials"] if t[4] is not None and not math.isfinite(t[4])),
        "batched_with": sorted({i.get("batched_with", 1) for i in infos}),
        "peak_gib_mua": max((i.get("peak_memory_gib", 0) for i in infos), default=None),
        "best_lr_mua": bm, "best_lr_plain": bp, "best_lr_within_one_step": within,
        "metric_by_lr_mua": by_lr(mua_rows), "metric_by_lr_plain": by_lr(plain["trials"]),
        "data": about, "timeline": tl,
    }  # fmt: skip


def triton_cache_files() -> int:
    """Files in Triton's kernel cache: with none, the first race also pays compiling Liger's kernels."""
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0


def gpu_counts(n: int) -> list[int]:
    return sorted({*(2**i for i in range(n.bit_length()) if 2**i <= n), n})


def scaling(name: str, steps: int, flags: list[str], smoke: bool = False) -> dict:
    """mua's sweep, fit and transfer on the first 1, 2, 4 … and all visible GPUs, one count after another.
    `smoke`: the tiny shape on the CPU, 1 and 2 slots standing in for the GPUs: the harness end to end."""
    if smoke:
        ids = ["cpu", "cpu"]
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
        ids = [v for v in visible.split(",") if v.strip()]
    recipe = recipe_for(name, steps, smoke)
    seed_cache(recipe)
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"mua-scaling-{name}-") as d:
        recipe_file = Path(d) / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        for n in gpu_counts(len(ids)):
            run = Path(d) / f"run{n}"
            if smoke:
                slots = [f for f in flags if not f.startswith("--workers-per-gpu")] + [f"--workers-per-gpu={n}"]
                mua = mua_answer(recipe_file, run, "cpu", slots)
            else:
                mua = mua_answer(recipe_file, run, "cuda", flags, {"CUDA_VISIBLE_DEVICES": ",".join(ids[:n])})
            df = load_trials(run)
            s = mua["sweep"]
            tl = timeline(run, s["start"], s["end"], s["start"] + mua["answer_s"], lines=s["lines"])
            rows.append({"gpus": n, "trials": len(df), "sweep_s": mua["sweep_s"], "answer_s": mua["answer_s"],
                         "answer_lr": mua["answer_lr"], "failed": int((df["status"] == "failed").sum()),
                         "errors": failed_errors(df),
                         "best_lr": best_lrs([(r["regime"], int(r["rank"]), float(r["lr"]), int(r["seed"]),
                                               float(r["metric"])) for _, r in df.iterrows()]),
                         "devices": tl.get("devices"), "timeline": tl})  # fmt: skip
    one = rows[0]
    for r in rows:
        r["x_one_gpu"] = round(one["sweep_s"] / r["sweep_s"], 2)
        r["same_best_lrs"] = r["best_lr"] == one["best_lr"]
    return {"workload": name, "steps": steps, "runs": rows}


def step_times(name: str, steps: int) -> dict:
    """In one process: ms per trial-step of the plain loop, of mua's serial trial and of K batched trials:
    graphed with Liger's kernels (K = 1…16), graphed without them (K = 1, 16), eager with them (K = 1, 16).
    Timed from the 10th step on: warm-up and capture excluded."""
    from mua_cli.accel.fused import fuse
    from mua_cli.train.batched import run_batched

    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    specs = [TrialSpec("B:1", 16, 2.0 ** (-14 + i / 2), 0) for i in range(16)]  # one group, 16 LRs
    plain_recipe = recipe.replace(dtype="float32")
    work = load_workload(plain_recipe, "cpu")
    times: list[float] = []
    plain_trial(specs[0], work.base, work.task, plain_recipe, "cuda", times)
    out = {"workload": name, "plain_ms": round(1e3 * (times[-1] - times[10]) / (len(times) - 11), 2)}
    del work
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    runs = [(1, True, False), (16, True, False), (1, False, True), *[(k, True, True) for k in (1, 2, 4, 8, 16)],
            (16, False, True)]  # (K, graphed, fused); the unfused ones first: fusing patches the model  # fmt: skip
    undo = None
    for k, graphs, fused in runs:
        if fused and undo is None:
            undo = fuse(base, "cuda", print)
        marks: list[tuple[int, float]] = []
        clock = lambda s, v, marks=marks: marks.append((s, time.perf_counter()))  # noqa: E731
        t_start = time.perf_counter()
        tag = f"mua_k{k}" + ("_graphed" if graphs else "") + ("" if fused else "_unfused")
        torch.cuda.reset_peak_memory_stats()
        try:
            if k == 1:
                res = [run_trial(specs[0], base, work.task, recipe, "cuda", clock, graphs, print)]
            else:
                res = run_batched(specs[:k], base, work.task, recipe, "cuda", clock, graphs, print)
        except torch.cuda.OutOfMemoryError:
            out[tag] = "out of memory"
            torch.cuda.empty_cache()
            continue
        out[f"{tag}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if res[0].status == "failed":
            out[tag] = res[0].error.splitlines()[0][:200]
            continue
        (s0, t0), (s1, t1) = marks[0], marks[-1]
        out[f"{tag}_ms_per_trial_step"] = round(1e3 * (t1 - t0) / (s1 - s0) / k, 2)
        out[f"{tag}_first_10_steps_s"] = round(t0 - t_start, 1)
    undo()
    if name == "350m":  # how far the compiler's fusion goes instead (unfused model): an experiment, not mua's path
        base = load_workload(recipe, "cuda").base.cuda()  # without the instance's Liger patches
        marks = []
        t_start = time.perf_counter()
        res = compiled_trial(specs[0], base, work.task, recipe, lambda s, v: marks.append((s, time.perf_counter())))
        if res.status == "failed":
            out["mua_k1_compiled_graphed"] = res.error.splitlines()[0][:200]
        else:
            (s0, t0), (s1, t1) = marks[0], marks[-1]
            out["mua_k1_compiled_graphed_ms_per_trial_step"] = round(1e3 * (t1 - t0) / (s1 - s0), 2)
            out["mua_k1_compiled_graphed_first_10_steps_s"] = round(t0 - t_start, 1)
    print(json.dumps(out), flush=True)
    return out


def compiled_trial(spec, base, task, recipe, clock):
    """mua's trial with its model torch.compile'd (elementwise kernels fused) inside the CUDA graph."""
    import mua_cli.train.loop as train

    prepare_ = train.prepare
    train.prepare = lambda *a, **kw: torch.compile(prepare_(*a, **kw))
    try:
        return run_trial(spec, base, task, recipe, "cuda", clock, True, print)
    finally:
        train.prepare = prepare_


def gpu_seconds(fn, reps: int = 20) -> float:
    """Seconds of GPU time per call of `fn`: `reps` calls captured as one CUDA graph and replayed, so that no
    host launch is timed (a rank-16 LoRA GEMM runs shorter than its launch; timed call by call, it was
    measured at 17 ms per step in one run and 25 in the next)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (5 * reps)


def gemm_seconds(m: int, k: int, n: int, reps: int = 20) -> float:
    """Seconds of one bf16 [m, k] × [k, n] matmul on the GPU."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    return gpu_seconds(lambda: a @ b, reps)


def matmul_rate() -> float:
    return 2 * 8192**3 / gemm_seconds(8192, 8192, 8192)


def liger() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return None


def step_flops(recipe: Recipe, base) -> float:
    cfg = base.config
    n = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    t = recipe.optim.batch_size * recipe.data.seq_len
    return 4 * n * t + 12 * cfg.num_hidden_layers * cfg.hidden_size * recipe.data.seq_len * t


def attention_seconds(batch: int, heads: int, seq: int, dim: int, backends) -> float:
    """Seconds of one causal attention, forward and backward, with the given SDPA kernels."""
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grad = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)

    def once():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    with torch.nn.attention.sdpa_kernel(backends, set_priority=True):
        return gpu_seconds(once, reps=10)


def step_floor(recipe: Recipe, base, rank: int) -> dict:
    """A lower bound on a LoRA step's time: its matrix multiplies and its attention, each timed alone at its
    shape in bf16, and nothing else (no norm, activation, residual add, cast or optimizer). Per linear layer:
    forward and the backward to its input; per adapted layer, LoRA's B side (its product, the gradient through
    B, B's gradient) and A side (x Aᵀ, the gradient to the input, A's gradient), as mua runs them: the layers
    of a group that read one input (lora_addmm.GROUPS) share one A side, with their A matrices concatenated,
    and their forward is one GEMM by [W | B] whose K is the group's summed ranks longer; per layer, attention
    forward and backward with the kernels mua's mask-free attention tries first (cuDNN's)."""
    from mua_cli.accel.attention import GPU_ORDER
    from mua_cli.accel.lora_addmm import GROUPS
    from mua_cli.train.adapters import lora_target_names

    t = recipe.optim.batch_size * recipe.data.seq_len
    adapted = set(lora_target_names(base, recipe.model.targets))
    timed: dict[tuple, float] = {}

    def gemm(m, k, n):
        if (m, k, n) not in timed:
            timed[(m, k, n)] = gemm_seconds(m, k, n)
        return timed[(m, k, n)]

    layers = []  # (name, n_in, n_out, group key or None)
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            group = next((g for g in GROUPS if child in g and all(f"{parent}.{c}" in adapted for c in g)), None)
            layers.append((name, m.in_features, m.out_features, f"{parent}.{group}" if group else None))
    ranks: dict[str, int] = {}
    for name, _, _, key in layers:
        if name in adapted and key:
            ranks[key] = ranks.get(key, 0) + rank
    base_s = lora_s = 0.0
    for name, n_in, n_out, key in layers:
        if name not in adapted:
            base_s += gemm(t, n_in, n_out) + gemm(t, n_out, n_in)
            continue
        lora_s += gemm(t, n_out, rank) + gemm(n_out, t, rank)  # the gradient through B, B's gradient
        if key:  # one GEMM of [x | x Aᵀ] by [W | B]: the base's, a few columns of K longer
            base_s += gemm(t, n_in + ranks[key], n_out) + gemm(t, n_out, n_in)
        else:
            base_s += gemm(t, n_in, n_out) + gemm(t, n_out, n_in)
            lora_s += gemm(t, rank, n_out) + gemm(t, n_in, rank) + gemm(t, rank, n_in) + gemm(rank, t, n_in)
    for key, r in ranks.items():  # each group's A side: x Aᵀ, the gradient to the input, A's gradient
        n_in = next(n for _, n, _, k in layers if k == key)
        lora_s += gemm(t, n_in, r) + gemm(t, r, n_in) + gemm(r, t, n_in)
    cfg = base.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    attn_s = cfg.num_hidden_layers * attention_seconds(
        recipe.optim.batch_size, heads, recipe.data.seq_len, dim, GPU_ORDER
    )
    ms = lambda x: round(1e3 * x, 2)  # noqa: E731
    return {"floor_matmul_ms": ms(base_s), "floor_attention_ms": ms(attn_s), "floor_lora_ms": ms(lora_s),
            "floor_step_ms": ms(base_s + attn_s + lora_s)}  # fmt: skip


def mfu(name: str, steps: int, peak_measured: float, graphs: bool, fused: bool) -> dict:
    """One LoRA trial (B:1, rank 16, LR 2^-10) of the plain loop and of mua's trial, in this process."""
    from mua_cli.accel.fused import fuse

    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    spec = TrialSpec("B:1", 16, 2.0**-10, 0)
    out = {"workload": name, "rank": spec.rank, "tokens_per_step": recipe.optim.batch_size * recipe.data.seq_len}
    # plain: fp32 weights under autocast; step time from the steady second half
    plain_recipe = recipe.replace(dtype="float32")
    work = load_workload(plain_recipe, "cpu")
    flops = step_flops(recipe, work.base)
    times: list[float] = []
    torch.cuda.reset_peak_memory_stats()
    plain_trial(spec, work.base, work.task, plain_recipe, "cuda", times)
    out["plain_step_ms"] = round(1e3 * (times[-1] - times[steps // 2]) / (steps - 1 - steps // 2), 2)
    out["plain_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del work
    # mua: one trial through run_trial (bf16 base, the step a CUDA graph); losses read every 10 steps
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    marks: list[tuple[int, float]] = []
    torch.cuda.reset_peak_memory_stats()
    clock = lambda s, v: marks.append((s, time.perf_counter()))  # noqa: E731
    undo = fuse(base, "cuda", print) if fused else lambda: None
    result = run_trial(spec, base, work.task, recipe, "cuda", clock, graphs, print)
    undo()
    assert result.status != "failed", result.error
    (s0, t0), (s1, t1) = marks[1], marks[-1]  # from step 19: the first 10 hold the warm-up and the capture
    out["mua_step_ms"] = round(1e3 * (t1 - t0) / (s1 - s0), 2)
    out["mua_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    out["tflop_per_step"] = round(flops / 1e12, 3)
    out.update(step_floor(recipe, base, spec.rank))
    for k in ("plain", "mua", "floor"):  # a floor: the highest rate those kernels allow
        rate = flops / (out[f"{k}_step_ms"] / 1e3)
        out[f"{k}_tflops"] = round(rate / 1e12, 1)
        out[f"{k}_mfu_datasheet"] = round(rate / DATASHEET_BF16, 3)
        out[f"{k}_mfu_measured_matmul"] = round(rate / peak_measured, 3)
    out["speedup"] = round(out["plain_step_ms"] / out["mua_step_ms"], 2)
    return out


def latest(reports: list[dict], key: str) -> list[dict]:
    """The rows of several runs: a later run's row of a workload replaces an earlier one's."""
    rows = {r["workload"]: r for report in reports for r in report.get(key, [])}
    return list(rows.values())


def legacy_table(reports: list[dict]) -> str:
    """The markdown tables of the JSON outputs written before benchmarks/record.py (benchmarks/baselines/)."""
    lines = [
        f"Runs on {reports[0]['gpu']}, torch {reports[0]['torch']}, liger-kernel "
        f"{reports[0].get('liger_kernel')}; a later run's row of a workload replaces an earlier one's:",
        "",
    ]
    lines += [f"- {r['date']}, {r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}: `{r['command']}` (8192³ bf16 matmul: "
              f"{r['bf16_matmul_8192_tflops']} TFLOP/s)" for r in reports]  # fmt: skip
    lines += ["",
             "| workload | params | trials × steps | plain trials/h | mua trials/h | ratio | mua startup | ratio after "
             "startup | peak GiB plain / mua per GPU | best LR plain = mua (±1 step) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in latest(reports, "throughput"):
        lines.append(
            f"| {r['workload']} | {r['params_M']}M | {r['trials']} × {r['steps']} | {r['plain_trials_per_h']} | "
            f"{r['mua_trials_per_h']} | {r['mua_x_plain']}× | {r['mua_startup_s']} s | "
            f"{r['mua_x_plain_after_startup']}× | "
            f"{r['plain_peak_gib']} / {r['mua_peak_gib_per_worker']} | {r['best_lr_within_one_step']} |"
        )
    lines += ["", "| one LoRA trial | rank | tokens/step | TFLOP/step | plain ms/step | mua ms/step | plain TFLOP/s "
              "(share of 989 / of measured) | mua TFLOP/s (share of 989 / of measured) | peak GiB plain / mua | "
              "floor ms/step: matmul + attention + LoRA | floor TFLOP/s (share of 989) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def rate(r, k):
        return f"{r[f'{k}_tflops']} ({r[f'{k}_mfu_datasheet']:.0%} / {r[f'{k}_mfu_measured_matmul']:.0%})"

    for r in latest(reports, "mfu"):
        floor = ("— | —" if "floor_step_ms" not in r else f"{r['floor_step_ms']} = {r['floor_matmul_ms']} + "
                 f"{r['floor_attention_ms']} + {r['floor_lora_ms']} | {r['floor_tflops']} "
                 f"({r['floor_mfu_datasheet']:.0%})")  # fmt: skip
        if "floor_cudnn_step_ms" in r:
            floor += (f"; with cuDNN's attention ({r['floor_attention_cudnn_ms']} ms): {r['floor_cudnn_step_ms']} ms, "
                      f"{r['floor_cudnn_tflops']} ({r['floor_cudnn_mfu_datasheet']:.0%})")  # fmt: skip
        lines.append(
            f"| {r['workload']} | {r['rank']} | {r['tokens_per_step']} | {r['tflop_per_step']} | "
            f"{r['plain_step_ms']} | {r['mua_step_ms']} | {rate(r, 'plain')} | {rate(r, 'mua')} | "
            f"{r['plain_peak_gib']} / {r['mua_peak_gib']} | {floor} |"
        )
    if rows := latest(reports, "scaling"):
        lines += ["", "mua's sweep on one GPU and on all of them (`--scaling`; see sweep/slots.py and pool.py):", "",
                  "| workload | trials × steps | GPUs | one GPU s (startup) | all GPUs s (startup) | scaling | "
                  "after startup | same best LRs |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['workload']} | {r['trials']} × {r['steps']} | {r['gpus']} | {r['one_gpu_s']} "
                  f"({r['one_gpu_startup_s']}) | {r['all_gpus_s']} ({r['all_gpus_startup_s']}) | {r['scaling']}× | "
                  f"{r['scaling_after_startup']}× | {r['same_best_lrs']} |" for r in rows]  # fmt: skip
    if steps := latest(reports, "step_times"):
        lines += ["", "ms per trial-step in one process (`--diag`): mua's serial trial (K=1) and K LoRA trials per "
                  "forward pass, each step a CUDA graph, with Liger's fused kernels and without (\"unfused\"); "
                  "eager: not graphed (fused); compiled: an experiment, the unfused serial trial with its model "
                  "torch.compile'd inside the graph. In brackets: the first 10 steps in seconds (warm-up, capture "
                  "and any compilation).", "",
                  "| workload | plain | K=1 eager | K=1 unfused | K=1 | K=2 | K=4 | K=8 | K=16 unfused | K=16 | "
                  "K=16 eager | K=1 compiled |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in steps:

            def cell(tag, r=r):
                v = r.get(f"{tag}_ms_per_trial_step")
                if v is None:
                    return "out of memory" if r.get(tag) == "out of memory" else "—"
                return f"{v} ({r[f'{tag}_first_10_steps_s']})"

            tags = ["mua_k1", "mua_k1_graphed_unfused", *[f"mua_k{k}_graphed" for k in (1, 2, 4, 8)],
                    "mua_k16_graphed_unfused", "mua_k16_graphed", "mua_k16", "mua_k1_compiled_graphed"]  # fmt: skip
            lines.append(f"| {r['workload']} | {r['plain_ms']} | " + " | ".join(cell(t) for t in tags) + " |")
    return "\n".join(lines)


def work_ratios(r: dict) -> tuple[float | None, float | None, float]:
    """A race's trial work alone: the plain loop's seconds in its trials over mua's sweep after its start-up
    (trial work ×); the most any sweep could reach against this plain loop if its trials took no time and its
    start-up were the plain process's own (plain s over the plain process's seconds outside its trials:
    ceiling ×); and those seconds (Python, imports, CUDA, the model)."""
    outside = round(r["plain_s"] - r["plain_trials_s"], 2)
    after = r["mua_sweep_s"] - (r.get("mua_startup_s") or 0.0)
    work = round(r["plain_trials_s"] / after, 2) if after > 0 else None
    return work, round(r["plain_s"] / outside, 1) if outside > 0 else None, outside


def markdown(reports: list[dict]) -> str:
    """docs/performance.md's tables, from this script's JSON outputs (record.py's), in the order given: for races
    and one-trial MFU a later report's row of a workload replaces an earlier one's; every scaling run is kept,
    so that runs of one workload (an A/B) stand side by side."""
    lines = ["Runs (commit, date, machine, command):", ""]
    for r in reports:
        m, v = r["machine"], r["versions"]
        hw = f"{m['gpu_count']} × {m['gpus'][0]}" if m["gpus"] else f"CPU: {m['cpu']}"
        lines.append(f"- {r['commit'][:7]}{' (dirty)' if r.get('dirty') else ''}, {r['started_utc'][:16]} UTC, {hw}, "
                     f"torch {v.get('torch')}, liger-kernel {v.get('liger-kernel')}: `{r['command']}`"
                     + (f" (8192³ bf16 matmul: {r['bf16_matmul_8192_tflops']} TFLOP/s)"
                        if r.get("bf16_matmul_8192_tflops") else ""))  # fmt: skip
    if rows := latest(reports, "races"):
        lines += ["", "| workload | params | trials × steps | mua sweep s | plain s | trials/h mua / plain | ratio | "
                  "mua answer s (fit + transfer) | plain answer s | ratio | start-up s mua / plain | trial work × | "
                  "ceiling × | device busy | failed | best LR ±1 step | mua's mean s a unit, K: built / reused | "
                  "mua's wind-down s |", "|---" * 18 + "|"]  # fmt: skip
        for r in rows:
            busy = ", ".join(f"{v['busy_share']:.0%}" for v in r["timeline"].get("devices", {}).values()
                             if v.get("busy_share") is not None)  # fmt: skip
            work, ceiling, outside = work_ratios(r)
            lines.append(
                f"| {r['workload']} | {r['params_M']}M | {r['trials']} × {r['steps']} | {r['mua_sweep_s']} | "
                f"{r['plain_s']} | {r['mua_trials_per_h']} / {r['plain_trials_per_h']} | **{r['x_trials_per_h']}×** | "
                f"{r['mua_answer_s']} ({r['mua_fit_s']} + {r['mua_transfer_s']}) | {r['plain_answer_s']} | "
                f"**{r['x_answer']}×** | {r['mua_startup_s']} / {outside} | {work}× | {ceiling}× | {busy} | "
                f"{r['failed']} | {r['best_lr_within_one_step']} | "
                f"{unit_seconds(r['timeline'].get('unit_phases_s') or {})} | "
                f"{phase_seconds(r['timeline'], 'wind-down')} |"
            )
    if rows := latest(reports, "mfu"):
        lines += ["", "| one LoRA trial | rank | tokens/step | TFLOP/step | plain ms/step | mua ms/step | mua TFLOP/s "
                  "(share of 989 / of measured) | floor ms/step (share of 989) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            lines.append(f"| {r['workload']} | {r['rank']} | {r['tokens_per_step']} | {r['tflop_per_step']} | "
                         f"{r['plain_step_ms']} | {r['mua_step_ms']} | {r['mua_tflops']} "
                         f"({r['mua_mfu_datasheet']:.1%} / {r['mua_mfu_measured_matmul']:.1%}) | "
                         f"{r.get('floor_step_ms')} ({r.get('floor_mfu_datasheet', 0):.0%}) |")  # fmt: skip
    for report in reports:  # each run's own: runs of one workload are compared with each other (A/B)
        for r in report.get("scaling", []):
            lines += ["", f"`--scaling`, {r['workload']}, {r['steps']} steps, at {report.get('commit')}:", "",
                      "| GPUs | trials | sweep s | start-up s | × one GPU | answer s | units (shapes, kept, ran out) | "
                      "mean s a unit, K: built / reused | same best LRs | failed |",
                      "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            lines += [scaling_row(x) for x in r["runs"]]
    return "\n".join(lines)


def scaling_row(x: dict) -> str:
    tl = x.get("timeline") or {}
    start = phase_seconds(tl, "start-up")
    u = tl.get("unit_phases_s") or {}
    return (
        f"| {x['gpus']} | {x['trials']} | {x['sweep_s']} | {start} | {x['x_one_gpu']}× | {x['answer_s']} | "
        f"{u.get('units')} ({u.get('shapes')}, {u.get('kept')}, {u.get('ran_out_beside_kept', '?')}) | "
        f"{unit_seconds(u)} | {x['same_best_lrs']} | {x['failed']} |"
    )


def phase_seconds(tl: dict, name: str) -> float | None:
    """A timeline phase's seconds (sweep_timeline.timeline), None where it has none of that name."""
    return next((p["s"] for p in tl.get("phases", []) if p["phase"] == name), None)


def unit_seconds(u: dict) -> str:
    """Mean seconds of a unit by its K, those built and those that reused a kept unit, from the timeline's
    per-unit rows (sweep_timeline.unit_phases): `K: built / reused`, '–' where there were none."""
    each = u.get("each") or {}
    cols = each.get("columns", [])
    if not {"k", "kept", "from_s", "to_s"} <= set(cols):
        return "?"
    spans: dict[tuple[int, int], list[float]] = {}
    for row in each.get("rows", []):
        r = dict(zip(cols, row, strict=False))
        spans.setdefault((r["k"], r["kept"]), []).append(r["to_s"] - r["from_s"])
    mean = lambda k, kept: f"{sum(v) / len(v):.2f}" if (v := spans.get((k, kept))) else "–"  # noqa: E731
    return ", ".join(f"{k}: {mean(k, 0)} / {mean(k, 1)}" for k in sorted({k for k, _ in spans}, reverse=True))


def summary(doc: dict) -> str:
    """The short table printed at the end of a run."""
    out = []
    if doc.get("races"):
        out.append(table(doc["races"], ["workload", "trials", "steps", "mua_sweep_s", "plain_s", "x_trials_per_h",
                                        "mua_answer_s", "plain_answer_s", "x_answer", "failed",
                                        "best_lr_within_one_step"]))  # fmt: skip
    if doc.get("mfu"):
        out.append(table(doc["mfu"], ["workload", "plain_step_ms", "mua_step_ms", "mua_mfu_datasheet", "speedup"]))
    for r in doc.get("scaling", []):
        out.append(table(r["runs"], ["gpus", "trials", "sweep_s", "x_one_gpu", "answer_s", "same_best_lrs"]))
    out += [f"{e['workload']}: {e['error']}" for e in doc.get("errors", [])]
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"workloads, from {', '.join([*RACES, '350m'])} (default {DEFAULT}; with "
                    "--scaling: 5m)")  # fmt: skip
    ap.add_argument("--steps", type=int, help="steps per trial (default 100; --smoke: 4)")
    ap.add_argument("--device", help="mua's and the plain loop's device (default cuda:0, or cpu without CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 3 LRs, 4 steps: the harness on the CPU")
    ap.add_argument("--diag", action="store_true", help="also time a step of each path in one process")
    ap.add_argument("--no-sweeps", action="store_true", help="no races (with --diag: the step times alone)")
    ap.add_argument("--scaling", action="store_true", help="mua alone on 1, 2, 4 … all visible GPUs")
    ap.add_argument("--workers-per-gpu", type=int, default=0, help="mua's slots per GPU (0: its own choice)")
    ap.add_argument("--batch-trials", type=int, default=0, help="mua's trials per pass (0: its own choice)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="mua without CUDA graphs")
    ap.add_argument("--no-fused-kernels", action="store_true", help="mua without Liger's fused kernels")
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/gpu_speed-<UTC time>.json)")
    ap.add_argument("--table", nargs="+", metavar="FILE", help="print the markdown tables of JSON outputs "
                    "(in the order run) and exit; no GPU needed")  # fmt: skip
    args = ap.parse_args()
    if args.table:
        loaded = [json.loads(Path(f).read_text()) for f in args.table]  # a report, or a list of them (one call's)
        reports = [r for doc in loaded for r in (doc if isinstance(doc, list) else [doc])]
        new = [r for r in reports if "benchmark" in r]
        old = [r for r in reports if "benchmark" not in r]
        print("\n\n".join([*([legacy_table(old)] if old else []), *([markdown(new)] if new else [])]))
        return
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda:0" if cuda and not args.smoke else "cpu")
    steps = args.steps or (4 if args.smoke else 100)
    only = (args.only or ("5m" if args.scaling else DEFAULT)).split(",")
    unknown = sorted(set(only) - {*RACES, "350m"})
    if unknown:
        sys.exit(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join([*RACES, '350m'])}")
    if device.startswith("cuda") and not cuda:
        sys.exit(f"--device {device}: no CUDA GPU here (--smoke runs on the CPU)")
    flags = [f"--workers-per-gpu={args.workers_per_gpu}", f"--batch-trials={args.batch_trials}",
             "--no-cuda-graphs" if args.no_cuda_graphs else "--cuda-graphs",
             "--no-fused-kernels" if args.no_fused_kernels else "--fused-kernels"]  # fmt: skip
    # Both sides start from the OS's file cache holding the libraries: on a fresh machine the first command to
    # import torch reads it from disk, and mua's sweep, which runs first, would pay that alone
    prime = (
        "import torch, transformers, peft, mua_cli.api, mua_cli.sweep.stream, mua_cli.sweep.trainer; "
        "torch.cuda.is_available() and torch.zeros(1, device='cuda')"
    )
    primed = command([sys.executable, "-c", prime])
    rec = Recording("gpu_speed")
    rec.set("settings", {"only": only, "steps": steps, "device": device, "smoke": args.smoke, "mua_flags": flags,
                         "triton_cache_files_at_start": triton_cache_files(),
                         "primed_imports_s": round(primed["end"] - primed["start"], 2)})  # fmt: skip
    print(rec.header(), flush=True)
    path = rec.save(args.out)
    if args.scaling:
        if not cuda and not args.smoke:
            sys.exit("--scaling needs CUDA GPUs (--smoke: 1 and 2 CPU slots)")
        for name in [n for n in only if n in SHAPES]:
            rec.add("scaling", scaling(name, steps, flags, args.smoke))
            path = rec.save(args.out)
    else:
        for name in [n for n in only if n in RACES and not args.no_sweeps]:
            try:
                row = race(name, steps, device, args.smoke, flags)
            except RuntimeError as e:  # one workload's failure is recorded; the others still run
                row = {"workload": name, "error": str(e)[:2000]}
                print(row["error"], flush=True)
            if "error" not in row:
                rec.add("races", row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("timeline", "data")}), flush=True)
            else:
                rec.add("errors", row)
            path = rec.save(args.out)
        if "350m" in only and not args.no_sweeps:
            if device.startswith("cuda"):
                peak = matmul_rate()
                rec.set("bf16_matmul_8192_tflops", round(peak / 1e12, 1))
                try:
                    rec.add("mfu", mfu("350m", steps, peak, not args.no_cuda_graphs, not args.no_fused_kernels))
                    print(json.dumps(rec.doc["mfu"][-1]), flush=True)
                except Exception as e:  # recorded beside the races already measured, not lost with them
                    rec.add("errors", {"workload": "350m", "error": f"{type(e).__name__}: {e}"[:2000]})
                    print(rec.doc["errors"][-1]["error"], flush=True)
            else:
                rec.add("errors", {"workload": "350m", "error": "the MFU case needs a CUDA device"})
            path = rec.save(args.out)
        if args.diag and device.startswith("cuda"):  # last: its runs would warm the kernels for the races above
            for name in [n for n in only if n in SHAPES]:
                rec.add("step_times", step_times(name, 30))
                path = rec.save(args.out)
    print()
    print(summary(rec.doc))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
