"""How many: slots per device, LoRA trials per pass, and the units of work a list of trials makes (train/stacked.py
groups LoRA trials that differ only in LR). Sizes only, from measurements (docs/performance.md); slots.py and
pool.py start what these say."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from ..spec.recipe import Recipe
from ..spec.trial import TrialSpec

SMALL, MEDIUM = 30e6, 300e6  # base parameters: the size classes below
# Tokens in one batched step, by size class, from step times measured with the step a CUDA graph
# (docs/performance.md): small models gain most from batching, ~120M models a little, large ones too little
# for the memory it takes, so they run one trial per pass.
TOKENS_PER_STEP = {"small": 1 << 17, "medium": 1 << 16, "large": 1 << 13}


@dataclass
class Execution:
    """How to run, not what: none of this enters a trial's identity."""

    device: str = "cpu"  # resolved: cpu, cuda (every visible GPU) or cuda:N (that one)
    workers_per_gpu: int = 0  # 0: by the model's size
    batch_trials: int = 0  # LoRA trials per forward pass; 0: by the model's size on a GPU, 1 on the CPU
    cuda_graphs: bool = True  # replay each step as a CUDA graph where it can be captured (graphed.py)
    fused_kernels: bool = True  # on a GPU, Liger's fused kernels where installed (fused.py)


def size_class(n_params: int) -> str:
    return "small" if n_params < SMALL else "medium" if n_params < MEDIUM else "large"


def rides(k: int, n_params: int) -> bool:
    """Whether a unit takes trials the planner may ask for later along (Sweep's first round): where a pass holds
    several trials of a small model, whose step costs little more for one more trial (docs/performance.md)."""
    return k > 1 and size_class(n_params) == "small"


def trials_per_pass(ex: Execution, recipe: Recipe, n_params: int) -> int:
    if ex.batch_trials:
        return ex.batch_trials
    if not ex.device.startswith("cuda"):
        return 1  # measured: no gain on the CPU (the work is the same, and it is compute-bound)
    tokens = recipe.optim.batch_size * recipe.data.seq_len
    return max(1, min(16, TOKENS_PER_STEP[size_class(n_params)] // tokens))


def slots_per_gpu(ex: Execution, n_params: int) -> int:
    """Slots per GPU. With CUDA graphs two threads share a GPU below 300M parameters: while one builds a group's
    model, warms it up, captures or evaluates, the other's replays keep the GPU busy (measured by
    benchmarks/pool_start.py; docs/performance.md). Eager steps are bound by the host launching kernels:
    several processes share a GPU."""
    if ex.workers_per_gpu:
        return ex.workers_per_gpu
    if ex.cuda_graphs:
        return {"small": 2, "medium": 2, "large": 1}[size_class(n_params)]
    return {"small": 4, "medium": 2, "large": 1}[size_class(n_params)]


def planned(ex: Execution, recipe: Recipe, trainer) -> tuple[int, int]:
    """On a GPU, slots per GPU and trials per pass: what speed asks for (the two functions above), made smaller
    where the memory estimate says it would not fit (memory.py). What the user set is taken as given."""
    slots, k = slots_per_gpu(ex, trainer.n_params), trials_per_pass(ex, recipe, trainer.n_params)
    from .memory import plan, usable_bytes

    lora = trainer.memory(max(recipe.lora_ranks)) if recipe.lora_ranks else None
    full = trainer.memory(None) if recipe.wants_full else None
    if slots > 1 and ex.cuda_graphs and not ex.workers_per_gpu and getattr(trainer, "has_dropout", False):
        slots = 1  # dropout stepped by one thread while another captures breaks that capture (trainer.py)
        if trainer.on_note:
            trainer.on_note("one slot per GPU: the model trains with dropout, whose random draws cannot run beside "
                           "another slot's CUDA graph capture")  # fmt: skip
    p = plan(lora, full, usable_bytes(trainer.device), slots, k)
    if p.reason and trainer.on_note:
        trainer.on_note(p.reason)
    return ex.workers_per_gpu or p.slots, ex.batch_trials or p.k


def units(pending: list[TrialSpec], recipe: Recipe, k: int, spare=(), room: int = 0) -> list[list[TrialSpec]]:
    """Trials of one (regime, rank, seed) in groups of at most k, by LR; the rest one by one. Balanced groups:
    8 trials with k=6 make two groups of 4, not 6 and 2. `spare`: trials that may ride along where a unit of
    their (regime, rank, seed) has room, up to `room` trials (default k) a unit."""
    from ..train.stacked import can_batch

    out: list[list[TrialSpec]] = []
    by_group: dict[tuple, list[TrialSpec]] = defaultdict(list)
    for s in pending:
        if k > 1 and can_batch(s, recipe):
            by_group[(s.regime, s.rank, s.seed)].append(s)
        else:
            out.append([s])
    extra: dict[tuple, list[TrialSpec]] = defaultdict(list)
    room = room or k
    for s in spare if room > 1 else ():
        if can_batch(s, recipe):
            extra[(s.regime, s.rank, s.seed)].append(s)
    for group, specs in by_group.items():
        specs.sort(key=lambda s: s.lr)
        n = math.ceil(len(specs) / k)
        size = math.ceil(len(specs) / n)
        chunks = [specs[i : i + size] for i in range(0, len(specs), size)]
        riders = extra.get(group, [])
        for chunk in chunks:
            free = room - len(chunk)
            chunk.extend(riders[:free])
            del riders[:free]
            chunk.sort(key=lambda s: s.lr)
        out.extend(chunks)
    return out


# The CPU. A small model's step spends as much time in Python as in arithmetic, and its matrices are too small
# for threads to share well: one worker process of one thread per core runs more trials per hour than one
# process of every thread, and a process of two threads slows many times over when another program takes a
# core (benchmarks/first_run.py). Worker processes cost their start, so only sweeps long enough get them.
CPU_WORKER_START_S = 5.5  # CPU seconds of a worker process's start: Python, torch, transformers, peft, the model
CPU_TOKEN_PARAMS_PER_S = 8e9  # one core's pace on the embedded default's trials: tokens trained × base parameters
CPU_MAX_SLOTS = 4  # measured on 2 cores; more is a guess, and each slot holds its own process and model


def cpu_slots(ex: Execution, recipe: Recipe, n_params: int, trials: int) -> int:
    """Slots on the CPU: `--workers-per-gpu N` as given; else one per core (at most CPU_MAX_SLOTS) for a small
    model whose `trials` would take one core ten worker starts or more; else one (this process, every thread)."""
    if ex.workers_per_gpu:
        return ex.workers_per_gpu
    import torch

    cores = torch.get_num_threads()
    seconds = (
        trials * recipe.optim.steps * recipe.optim.batch_size * recipe.data.seq_len * n_params / CPU_TOKEN_PARAMS_PER_S
    )
    if cores < 2 or size_class(n_params) != "small" or seconds < 10 * CPU_WORKER_START_S:
        return 1
    return min(cores, CPU_MAX_SLOTS)


def keep_freed_memory() -> bool:
    """Lets glibc keep freed blocks of up to 32 MiB in this process's heap, from now on. By default it hands a
    freed block of more than 128 KiB (one activation of the embedded model) back to the kernel, or trims it off
    the heap's top, and the next step's allocation of it takes fresh pages, each zeroed at its first touch: every
    CPU step faults its activations in again (tests/test_execute_memory.py; what it costs:
    `python benchmarks/first_run.py --parts cpu`). What a trial computes is untouched. Returns whether it
    applied (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt (not glibc)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
