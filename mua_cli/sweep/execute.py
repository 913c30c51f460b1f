"""Where and how a sweep's trials run: units of work (train/stacked.py groups LoRA trials that differ only in LR),
run in this process on one device, or by slots over every visible GPU (several per GPU when asked): threads of
this process, or worker processes for eager steps, all taking units from one queue.

This process alone writes the trial store: slots send results back, so SQLite never sees two writers.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import MuaError
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec

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


def trials_per_pass(ex: Execution, recipe: Recipe, n_params: int) -> int:
    if ex.batch_trials:
        return ex.batch_trials
    if not ex.device.startswith("cuda"):
        return 1  # measured: no gain on the CPU (the work is the same, and it is compute-bound)
    tokens = recipe.optim.batch_size * recipe.data.seq_len
    return max(1, min(16, TOKENS_PER_STEP[size_class(n_params)] // tokens))


def workers_per_gpu(ex: Execution, n_params: int) -> int:
    """Slots per GPU. With CUDA graphs two threads share a GPU below 300M parameters: while one builds a group's
    model, warms it up, captures or evaluates, the other's replays keep the GPU busy (measured by
    benchmarks/pool_start.py; docs/performance.md). Eager steps are bound by the host launching kernels:
    several processes share a GPU."""
    if ex.workers_per_gpu:
        return ex.workers_per_gpu
    if ex.cuda_graphs:
        return {"small": 2, "medium": 2, "large": 1}[size_class(n_params)]
    return {"small": 4, "medium": 2, "large": 1}[size_class(n_params)]


def planned(ex: Execution, recipe: Recipe, runner) -> tuple[int, int]:
    """On a GPU, slots per GPU and trials per pass: what speed asks for (the two functions above), made smaller
    where the memory estimate says it would not fit (memory.py). What the user set is taken as given."""
    slots, k = workers_per_gpu(ex, runner.n_params), trials_per_pass(ex, recipe, runner.n_params)
    from .memory import plan, usable_bytes

    lora = runner.memory(max(recipe.lora_ranks)) if recipe.lora_ranks else None
    full = runner.memory(None) if recipe.wants_full else None
    if slots > 1 and ex.cuda_graphs and not ex.workers_per_gpu and getattr(runner, "has_dropout", False):
        slots = 1  # dropout stepped by one thread while another captures breaks that capture (runner.py)
        if runner.on_note:
            runner.on_note("one slot per GPU: the model trains with dropout, whose random draws cannot run beside "
                           "another slot's CUDA graph capture")  # fmt: skip
    p = plan(lora, full, usable_bytes(runner.device), slots, k)
    if p.reason and runner.on_note:
        runner.on_note(p.reason)
    return ex.workers_per_gpu or p.slots, ex.batch_trials or p.k


def units(pending: list[TrialSpec], recipe: Recipe, k: int) -> list[list[TrialSpec]]:
    """Trials of one (regime, rank, seed) in groups of at most k, by LR; the rest one by one. Balanced groups:
    8 trials with k=6 make two groups of 4, not 6 and 2."""
    from ..train.stacked import can_batch

    out: list[list[TrialSpec]] = []
    by_group: dict[tuple, list[TrialSpec]] = defaultdict(list)
    for s in pending:
        if k > 1 and can_batch(s, recipe):
            by_group[(s.regime, s.rank, s.seed)].append(s)
        else:
            out.append([s])
    for specs in by_group.values():
        specs.sort(key=lambda s: s.lr)
        n = math.ceil(len(specs) / k)
        size = math.ceil(len(specs) / n)
        out.extend(specs[i : i + size] for i in range(0, len(specs), size))
    return out


class LocalExecutor:
    """Every unit in this process's main thread, on one device (with per-step progress)."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, runner=None):
        from .runner import TrialRunner

        self.recipe, self.listener = recipe, listener
        if runner is None:
            runner = TrialRunner(recipe, ex.device, listener, ex.cuda_graphs, ex.fused_kernels)
        self.runner = runner
        self.k = trials_per_pass(ex, recipe, self.runner.n_params)
        if self.k > 1:
            listener.note(f"up to {self.k} LoRA trials per forward pass (batched adapters)")

    def run(self, pending: list[TrialSpec]) -> Iterator[tuple[TrialSpec, TrialResult]]:
        for unit in units(pending, self.recipe, self.k):
            self.listener.trial_start(unit[0])
            yield from zip(unit, self.runner.run_unit(unit), strict=True)

    def close(self, interrupted: bool = False) -> None:
        self.runner.close()


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


def _cpu_executor(recipe: Recipe, ex: Execution, listener, first, trials: int):
    """One slot: this process's main thread, with every thread torch has. More: this process and worker
    processes, the cores shared out among them as torch threads; this process's are given back on close."""
    import torch

    from .pool import PoolExecutor

    keep_freed_memory()

    slots = cpu_slots(ex, recipe, first.n_params, trials)
    if slots == 1:
        return LocalExecutor(recipe, ex, listener, first)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // slots))  # this process's, and each worker's (pool.worker_main)
    try:
        return PoolExecutor(recipe, dataclasses.replace(ex, workers_per_gpu=slots), listener, ["cpu"], first,
                            after_close=lambda: torch.set_num_threads(before))  # fmt: skip
    except BaseException:
        torch.set_num_threads(before)
        raise


def executor(recipe: Recipe, ex: Execution, listener, trials: int = 0):
    """Slots over every visible GPU (`cuda`), or several on one device (`--workers-per-gpu N`, or by the
    model's size on a GPU, or on the CPU by its size and the `trials` to run, 0 if not known: cpu_slots); this
    process's main thread when one slot is all there is. The first model is loaded here, before that choice,
    which depends on its size."""
    from .runner import TrialRunner

    devices = [ex.device]
    if ex.device == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise MuaError("no CUDA GPU is visible")
        ex = dataclasses.replace(ex, device=devices[0]) if len(devices) == 1 else ex
    first = TrialRunner(recipe, devices[0], listener, ex.cuda_graphs, ex.fused_kernels)
    if not devices[0].startswith("cuda"):
        return _cpu_executor(recipe, ex, listener, first, trials)
    # the memory plan, resolved here into explicit settings that every slot then follows
    slots, k = planned(dataclasses.replace(ex, device=devices[0]), recipe, first)
    ex = dataclasses.replace(ex, workers_per_gpu=slots, batch_trials=k)
    if len(devices) == 1 and slots == 1:
        return LocalExecutor(recipe, ex, listener, first)
    from .pool import PoolExecutor

    return PoolExecutor(recipe, ex, listener, devices, first)  # which closes `first` if it cannot start
