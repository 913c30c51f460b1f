"""mua's sweep against a plain serial peft loop, on the same trials, in the same run, on the GPU.

    python benchmarks/gpu_speed.py [--only 5m,124m,350m] [--steps 100] [--diag] [--no-sweeps]
        [--no-fused-kernels] [--no-cuda-graphs] [--out benchmarks/gpu_speed.json]
    python benchmarks/gpu_speed.py --table RUN.json [RUN.json ...]     # docs/performance.md's tables

Workloads: Llama-shaped causal LMs of about 5M, 120M and 365M parameters (MLP widths multiples of 256), built
from their configs with random weights (the hubs are out of reach; step time does not depend on the weights),
byte-level, fed windows of the embedded Britannica corpus, batch 16 × 512 tokens. The 5m sweep is the
embedded default's grid (A:r and B:1, ranks 4, 16, 64, 8 LRs); 124m sweeps 8 LRs at rank 16.

- plain: what one writes by hand: per trial a copy of the fp32 base, peft `get_peft_model` (with μA's init, as
  mua sets it, so that both run the same trials), torch AdamW (foreach), LambdaLR warmup + cosine, bf16
  autocast, `loss.item()` every step, one trial after another.
- mua: `run_sweep` over the same trials (same ranks, LRs, steps, seed): every visible GPU, each step a CUDA
  graph, Liger's fused kernels where installed, several LoRA trials per forward pass where the model is small,
  bf16 frozen base, fused AdamW, losses read every 10 steps. Its wall time includes loading the model,
  compiling the fused kernels (and starting workers, with several GPUs).
- --diag (run last, so that its runs do not warm the sweeps' kernels): ms per trial-step in one process,
  eager and graphed, fused and not, for K = 1…16 trials per pass, and the 350M trial with its unfused model
  torch.compile'd inside the graph (an experiment).
- Science check: per (regime, rank), the best LR of mua's trials is within one grid step of the plain loop's.
- MFU (350M, one LoRA trial, rank 16): FLOPs per step = 4·N·T (forward, and backward to the activations; the
  frozen weights get no gradient) + 12·layers·d·seq·T (attention, fwd + bwd, PaLM's count), N = the matmul
  weights (all linear layers and the LM head), T = tokens per step; LoRA's own FLOPs (< 1 %) are left out.
  The share is of the datasheet's 989 TFLOP/s dense bf16 and of an 8192³ bf16 matmul measured in the same run.
  The floor: the step's matrix multiplies and attention alone, timed as CUDA graph replays (step_floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mua_cli.accel.fused import fuse  # noqa: E402
from mua_cli.api import (  # noqa: E402
    Execution,  # noqa: E402
    Listener,
    run_sweep,
)
from mua_cli.spec.recipe import Recipe  # noqa: E402
from mua_cli.sweep.grid import grid_plan, make_spec  # noqa: E402
from mua_cli.sweep.store import load_trials  # noqa: E402
from mua_cli.train.adapters import prepare  # noqa: E402
from mua_cli.train.loop import lr_lambda, run_trial  # noqa: E402
from mua_cli.train.models import embedded_config, embedded_folder  # noqa: E402
from mua_cli.train.workload import load_workload  # noqa: E402

DATASHEET_BF16 = 989e12
# Llama-shaped, byte vocabulary. Widths are multiples of 256, as in real models: a bf16 GEMM of width 3500 (the
# first version of this table) ran 3.2x slower than one of 3584 on the H200 (benchmarks/gpu_profile.py).
SHAPES = {
    "5m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4),
    "124m": dict(hidden_size=768, intermediate_size=3328, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16),
}
SWEEPS = {  # the trials each workload runs: regimes × ranks × LRs, one seed; 5m: the embedded default's grid
    "5m": dict(regimes="A:r,B:1", ranks="4,16,64", lrs="2^-12:2^-5"),
    "124m": dict(regimes="B:1", ranks="16", lrs="2^-12:2^-5"),
    "350m": dict(regimes="B:1", ranks="16", lrs="2^-10:2^-8"),
}


def recipe_for(name: str, steps: int) -> Recipe:
    shape = {
        **SHAPES[name],
        "num_key_value_heads": SHAPES[name]["num_attention_heads"],
        "max_position_embeddings": 1024,
    }
    return Recipe.of(
        name=f"bench-{name}", model="embedded:tiny", model_config=shape,
        pretrain={"steps": 1, "data": "embedded:shakespeare"},  # never run: seed_cache puts a model where it goes
        data="embedded:britannica", seq_len=512, batch_size=16, steps=steps, eval_fraction=0.0, dtype="bfloat16",
        max_extend=0, **SWEEPS[name],
    )  # fmt: skip


def seed_cache(recipe: Recipe) -> None:
    """A random-init model of the recipe's shape, where mua looks for its pretrained model (no pretraining)."""
    from transformers import LlamaForCausalLM

    folder = embedded_folder(recipe.model, recipe.data.seq_len)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(embedded_config(recipe.model)).save_pretrained(folder)


def plain_trial(spec, base, task, recipe, times=None) -> float:
    """The plain loop: returns the final metric (mean train loss of the last 10 % of steps; inf if diverged)."""
    model = prepare(
        base, spec.regime, spec.rank, recipe.optim.alpha0, recipe.model.targets, spec.seed
    )  # peft + μA's init
    model.cuda().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.optim))
    batch_at = task.train_batches(spec.seed, recipe.optim.steps, recipe.optim.batch_size, "cuda")
    losses = []
    for step in range(recipe.optim.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            batch = batch_at(step)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if times is not None:
            times.append(time.perf_counter())
        if not math.isfinite(losses[-1]) or losses[-1] > recipe.optim.divergence_factor * losses[0]:
            return math.inf
    tail = losses[-max(1, math.ceil(0.1 * len(losses))) :]
    return sum(tail) / len(tail)


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


def step_times(name: str, steps: int) -> dict:
    """In one process: ms per trial-step of the plain loop, of mua's serial trial and of K batched trials:
    graphed with Liger's kernels (K = 1…16), graphed without them (K = 1, 16), eager with them (K = 1, 16).
    Timed from the 10th step on: warm-up and capture excluded."""
    from mua_cli.train.loop import run_batched

    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    specs = [make_spec(recipe, "B:1", 16, 2.0 ** (-14 + i / 2), 0) for i in range(16)]  # one group, 16 LRs
    plain_recipe = recipe.replace(dtype="float32")
    work = load_workload(plain_recipe, "cpu")
    times: list[float] = []
    plain_trial(specs[0], work.base, work.task, plain_recipe, times)
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


def throughput(name: str, steps: int, gpus: int, ex: Execution) -> dict:
    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    specs = grid_plan(recipe)
    plain_recipe = recipe.replace(dtype="float32")
    work = load_workload(plain_recipe, "cpu")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    plain = {(s.regime, s.rank, s.lr): plain_trial(s, work.base, work.task, plain_recipe) for s in specs}
    plain_s = time.perf_counter() - t0
    plain_mem = torch.cuda.max_memory_allocated() / 2**30
    n_params = sum(p.numel() for p in work.base.parameters())
    del work
    torch.cuda.empty_cache()
    row = {"workload": name, "params_M": round(n_params / 1e6, 1),
           "trials": len(specs), "steps": steps, "plain_s": round(plain_s, 1),
           "plain_trials_per_h": round(len(specs) * 3600 / plain_s), "plain_peak_gib": round(plain_mem, 1)}  # fmt: skip
    for n in sorted({1, gpus}):
        run = timed_sweep(recipe, n, ex)
        tag = "mua" if n == 1 else f"mua_{n}gpu"
        row[f"{tag}_s"], row[f"{tag}_startup_s"] = run["s"], run["startup_s"]
        row[f"{tag}_trials_per_h"] = round(len(specs) * 3600 / run["s"])
        row[f"{tag}_x_plain"] = round(plain_s / run["s"], 2)
        row[f"{tag}_x_plain_after_startup"] = round(plain_s / (run["s"] - run["startup_s"]), 2)
        row[f"{tag}_peak_gib_per_worker"], row[f"{tag}_failed"] = run["peak_gib"], run["failed"]
        row[f"{tag}_capture_fallbacks"] = run["capture_fallbacks"]
        if n == 1:
            bp, bm = best_lrs(plain), best_lrs(run["metrics"])
            row["best_lr_plain"], row["best_lr_mua"] = bp, bm
            row["best_lr_within_one_step"] = all(abs(math.log2(bm.get(k, math.inf) / v)) <= 1 for k, v in bp.items())
    if gpus > 1:
        row["gpu_scaling"] = round(row["mua_s"] / row[f"mua_{gpus}gpu_s"], 2)
    return row


def timed_sweep(recipe: Recipe, gpus: int, ex: Execution) -> dict:
    """mua's sweep of the recipe on cuda:0 (gpus=1) or on every visible GPU, timed from the call."""
    with tempfile.TemporaryDirectory() as d:
        t0, clock = time.perf_counter(), Clock()
        dev = "cuda" if gpus > 1 else "cuda:0"  # cuda: every visible GPU
        run_sweep(recipe, Path(d) / "run", dev, clock, execution=dataclasses.replace(ex, device=dev))
        seconds = time.perf_counter() - t0
        df = load_trials(Path(d) / "run")
    peaks = [i.get("peak_memory_gib", 0) for i in df["info"] if isinstance(i, dict)]
    # each GPU's trials and the seconds it spent in them: how evenly the groups of trials were shared
    busy = ({str(d): [int(len(g)), round(float(g["wall_time"].sum()), 1)] for d, g in df.groupby("device")}
            if {"device", "wall_time"} <= set(df.columns) else {})  # fmt: skip
    # r["info"], not r.info: a row's .info is pandas' method
    walls = {
        r["key"]: (float(r["wall_time"]), r["info"].get("batched_with", 1) if isinstance(r["info"], dict) else 1)
        for _, r in df.iterrows()
    }
    return {"s": round(seconds, 1), "startup_s": round((clock.ready or t0) - t0, 1), "trials_and_busy_s": busy,
            "wall_and_batch": walls, "capture_fallbacks": clock.fallbacks,
            "metrics": {(r.regime, int(r["rank"]), float(r.lr)): float(r.metric) for _, r in df.iterrows()},
            "peak_gib": max(peaks) if peaks else None, "failed": int((df["status"] == "failed").sum())}  # fmt: skip


def scaling(name: str, steps: int, gpus: int, ex: Execution) -> dict:
    """mua's sweep on one GPU and on all of them (no plain loop): the multi-GPU target."""
    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    one, many = timed_sweep(recipe, 1, ex), timed_sweep(recipe, gpus, ex)
    same = best_lrs(one["metrics"]) == best_lrs(many["metrics"])
    return {"workload": name, "trials": len(grid_plan(recipe)), "steps": steps, "gpus": gpus,
            "one_gpu_s": one["s"], "one_gpu_startup_s": one["startup_s"],
            "all_gpus_s": many["s"], "all_gpus_startup_s": many["startup_s"],
            "scaling": round(one["s"] / many["s"], 2),
            "scaling_after_startup": round((one["s"] - one["startup_s"]) / (many["s"] - many["startup_s"]), 2),
            "failed": one["failed"] + many["failed"], "same_best_lrs": same,
            "capture_fallbacks": one["capture_fallbacks"] + many["capture_fallbacks"],
            "trials_and_busy_s_per_gpu": many["trials_and_busy_s"]}  # fmt: skip


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


def mfu(name: str, steps: int, peak_measured: float, ex: Execution) -> dict:
    recipe = recipe_for(name, steps)
    seed_cache(recipe)
    spec = grid_plan(recipe)[0]
    out = {"workload": name, "rank": spec.rank, "tokens_per_step": recipe.optim.batch_size * recipe.data.seq_len}
    # plain: fp32 weights under autocast; step time from the steady second half
    plain_recipe = recipe.replace(dtype="float32")
    work = load_workload(plain_recipe, "cpu")
    flops = step_flops(recipe, work.base)
    times: list[float] = []
    torch.cuda.reset_peak_memory_stats()
    plain_trial(spec, work.base, work.task, plain_recipe, times)
    out["plain_step_ms"] = round(1e3 * (times[-1] - times[steps // 2]) / (steps - 1 - steps // 2), 2)
    out["plain_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del work
    # mua: one trial through run_trial (bf16 base, the step a CUDA graph); losses read every 10 steps
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    marks: list[tuple[int, float]] = []
    torch.cuda.reset_peak_memory_stats()
    clock = lambda s, v: marks.append((s, time.perf_counter()))  # noqa: E731
    undo = fuse(base, "cuda", print) if ex.fused_kernels else lambda: None
    result = run_trial(spec, base, work.task, recipe, "cuda", clock, ex.cuda_graphs, print)
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


def table(reports: list[dict]) -> str:
    """The markdown tables of docs/performance.md, from the benchmark's JSON outputs, in the order run."""
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
        lines += ["", "mua's sweep on one GPU and on all of them (`--scaling`; see the pool in execute.py):", "",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="5m,124m,350m")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--diag", action="store_true", help="also time a step of each path in one process")
    ap.add_argument("--no-sweeps", action="store_true", help="skip the plain-vs-mua sweeps (5m, 124m)")
    ap.add_argument("--scaling", action="store_true", help="only mua's sweeps (--only's 5m, 124m) on one GPU "
                    "and on all visible GPUs")  # fmt: skip
    ap.add_argument("--workers-per-gpu", type=int, default=0, help="mua's worker processes per GPU (0: auto)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="mua without CUDA graphs")
    ap.add_argument("--no-fused-kernels", action="store_true", help="mua without Liger's fused kernels")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--table", nargs="+", metavar="FILE", help="print the markdown tables of JSON outputs "
                    "(in the order run) and exit; no GPU needed")  # fmt: skip
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_speed.py needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    peak = matmul_rate()
    report = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
        "command": "python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:]),
        "bf16_matmul_8192_tflops": round(peak / 1e12, 1), "throughput": [], "mfu": [], "liger_kernel": liger(),
    }  # fmt: skip
    only = args.only.split(",")
    ex = Execution("cuda", args.workers_per_gpu, 0, not args.no_cuda_graphs, not args.no_fused_kernels)
    if args.scaling:
        report["scaling"] = [scaling(n, args.steps, gpus, ex) for n in ("5m", "124m") if n in only]
        print(json.dumps(report["scaling"]), flush=True)
        only = []
    for name in [n for n in ("5m", "124m") if n in only and not args.no_sweeps]:
        report["throughput"].append(throughput(name, args.steps, gpus, ex))
        print(json.dumps(report["throughput"][-1]), flush=True)
    if "350m" in only:
        report["mfu"].append(mfu("350m", args.steps, peak, ex))
        print(json.dumps(report["mfu"][-1]), flush=True)
    if args.diag and only:  # last: its runs would warm the kernels' compilation for the sweeps above
        report["step_times"] = [step_times(n, 30) for n in ("5m", "124m", "350m") if n in only]
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
