"""Where and how a sweep's trials run: units of work (batched.py groups LoRA trials that differ only in LR),
run in this process on one device, or by this process and worker processes over every visible GPU (several
per GPU when asked), all taking units from one queue.

This process alone writes the trial store: workers send results back, so SQLite never sees two writers.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

from .errors import MuaError
from .recipe import Recipe
from .trial import TrialResult, TrialSpec

SMALL, MEDIUM = 30e6, 300e6  # base parameters: the size classes below
# Tokens in one batched step, from step times measured on an H200 with the step a CUDA graph and fused kernels
# (docs/performance.md): at ~5M parameters 16 trials per pass cost 2.07 ms per trial-step against 4.19 alone;
# at ~120M, 8 trials 16.6 against 19.4 (16: 3.5 % faster for twice the memory); at ~365M (measured before
# the captured step kept flash attention), 8 trials were 11 % faster than one but took 62 GiB instead of 10,
# so large models run one trial per pass.
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
    tokens = recipe.batch_size * recipe.seq_len
    return max(1, min(16, TOKENS_PER_STEP[size_class(n_params)] // tokens))


def workers_per_gpu(ex: Execution, n_params: int) -> int:
    if ex.workers_per_gpu:
        return ex.workers_per_gpu
    if ex.cuda_graphs:
        return 1  # a replayed step keeps the GPU busy from one process, which starts in ~2 s instead of ~25
    # eager steps are bound by the host launching kernels: several processes share a GPU (measured 2026-11-29)
    return {"small": 4, "medium": 2, "large": 1}[size_class(n_params)]


def units(pending: list[TrialSpec], recipe: Recipe, k: int) -> list[list[TrialSpec]]:
    """Trials of one (regime, rank, seed) in groups of at most k, by LR; the rest one by one. Balanced groups:
    8 trials with k=6 make two groups of 4, not 6 and 2."""
    from .batched import can_batch

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
    """Every unit in this process, on one device."""

    def __init__(self, recipe: Recipe, ex: Execution, listener):
        from .runner import TrialRunner

        self.recipe, self.listener = recipe, listener
        self.runner = TrialRunner(recipe, ex.device, listener, ex.cuda_graphs, ex.fused_kernels)
        self.k = trials_per_pass(ex, recipe, self.runner.n_params)
        if self.k > 1:
            listener.note(f"up to {self.k} LoRA trials per forward pass (batched adapters)")

    def run(self, pending: list[TrialSpec]) -> Iterator[tuple[TrialSpec, TrialResult]]:
        for unit in units(pending, self.recipe, self.k):
            self.listener.trial_start(unit[0])
            yield from zip(unit, self.runner.run_unit(unit), strict=True)

    def close(self, interrupted: bool = False) -> None:
        self.runner.close()


class _Notes:
    """A worker's notes (a failed graph capture, say) go to the parent, which shows them."""

    def __init__(self, results, device: str):
        self.results, self.device = results, device

    def note(self, message: str) -> None:
        self.results.put(("note", self.device, message))


def _worker(recipe: Recipe, device: str, graphs: bool, fused: bool, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    try:
        from .runner import TrialRunner

        runner = TrialRunner(recipe, device, _Notes(results, device), graphs, fused)
    except Exception as e:  # noqa: BLE001 — reported to the parent as one line
        results.put(("error", device, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", device, runner.n_params))
    while (unit := tasks.get()) is not None:
        for spec, result in zip(unit, runner.run_unit(unit), strict=True):
            results.put(("done", spec, result))


class PoolExecutor:
    """Several processes over the visible GPUs (or several on one device), every one taking its next unit from
    one queue. This process runs the first slot itself, in a thread: it loads the model (pretraining and
    caching the embedded model if it must) in ~2 s, where a worker process takes ~10 s to start (Python,
    torch, the model), then starts the workers for the other slots and runs units while they start. The main
    thread stores every result as it comes (a Ctrl-C loses only units cut off mid-way)."""

    def __init__(self, recipe: Recipe, ex: Execution, listener, devices: list[str]):
        import torch.multiprocessing as mp

        from .runner import TrialRunner

        self.recipe, self.listener, self.ctx = recipe, listener, mp.get_context("spawn")
        self.tasks, self.results = self.ctx.Queue(), self.ctx.Queue()
        self.procs: list = []
        # no per-step progress from this process's slot (the other slots' trials run at the same time); its step
        # callback is where a Ctrl-C stops it (close), so that no thread is inside torch when the process exits
        self._stop = threading.Event()
        own = SimpleNamespace(note=listener.note, step=self._stop_point)
        self.local = TrialRunner(recipe, devices[0], own, ex.cuda_graphs, ex.fused_kernels)
        self.k = trials_per_pass(ex, recipe, self.local.n_params)
        per = workers_per_gpu(ex, self.local.n_params)
        slots = [devices[i % len(devices)] for i in range(len(devices) * per)]
        try:
            for device in slots[1:]:
                p = self.ctx.Process(
                    target=_worker, args=(recipe, device, ex.cuda_graphs, ex.fused_kernels, self.tasks, self.results),
                    daemon=True,
                )  # fmt: skip
                p.start()
                self.procs.append(p)
        except BaseException:  # the workers started so far stop, and this process's model (and Liger's patches) go
            for p in self.procs:
                p.terminate()
            self.local.close()
            raise
        self.slots = len(slots)
        self._free, self._error = threading.Event(), None  # this process's slot: idle; what stopped it
        self._free.set()
        batched = f", up to {self.k} LoRA trials per forward pass" if self.k > 1 else ""
        listener.note(f"{len(devices)} device(s) ({', '.join(devices)}) × {per} process(es): this one and "
                      f"{len(self.procs)} worker process(es) starting{batched}")  # fmt: skip

    def run(self, pending: list[TrialSpec]) -> Iterator[tuple[TrialSpec, TrialResult]]:
        # no fewer units than slots where the trials allow it: an idle slot wastes its share of the GPU
        k = min(self.k, max(1, math.ceil(len(pending) / self.slots)))
        work = units(pending, self.recipe, k)
        for unit in work:
            self.tasks.put(unit)
        left, queued = sum(len(u) for u in work), True
        while left:
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]  # workers leave only when told
            if dead:
                msg = (f"a worker process died (exit code {dead[0].exitcode}); finished trials are stored, "
                       "run again to resume")  # fmt: skip
                raise MuaError(msg)
            if self._free.is_set():
                if self._error is not None:
                    raise self._error
                unit = self._take() if queued else None
                queued = unit is not None  # once empty, it stays so: every unit went to a live process
                if unit is not None:
                    self._free.clear()
                    threading.Thread(target=self._run_local, args=(unit,), name="mua-own-slot", daemon=True).start()
            # results as they come, this process's and the workers' alike: each is stored at once
            if (message := self._get(timeout=0.5)) is not None:
                left -= 1
                yield message[1], message[2]

    def _run_local(self, unit: list[TrialSpec]) -> None:
        """This process's slot, in a thread: its results join the workers' in the one queue."""
        try:
            if self.local.device.startswith("cuda:"):  # the current GPU is per thread (Triton launches on it)
                import torch

                torch.cuda.set_device(self.local.device)
            for spec, result in zip(unit, self.local.run_unit(unit), strict=True):
                self.results.put(("done", spec, result))
        except BaseException as e:  # noqa: BLE001 — raised again by run(), in the main thread
            self._error = e
        self._free.set()

    def _stop_point(self, step: int, loss: float) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt  # trials let it through: the unit stops, nothing of it is stored

    def _take(self) -> list[TrialSpec] | None:
        """The next unit, or None when the queue is empty (a second's wait covers the queue's feeder thread)."""
        try:
            return self.tasks.get(timeout=1)
        except queue.Empty:
            return None

    def _get(self, timeout: float):
        """The next result, or None if none comes within `timeout` seconds; notes are shown."""
        while True:
            try:
                message = self.results.get(timeout=timeout)
            except queue.Empty:
                return None
            if message[0] == "done":
                return message
            if message[0] == "error":  # it takes no units: the other processes run them
                self.listener.note(f"worker on {message[1]} could not load the workload: {message[2]}")
            elif message[0] == "note":
                self.listener.note(f"{message[1]}: {message[2]}")

    def close(self, interrupted: bool = False) -> None:
        """Workers finish their unit and exit; on Ctrl-C or an error they stop at once (a unit cut off
        mid-way was not stored, so it runs again next time)."""
        self._stop.set()
        for p in self.procs:
            if interrupted:
                p.terminate()
            else:
                self.tasks.put(None)
        self._free.wait(timeout=60)  # this process's slot stops at its next step check (every 10 steps)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.local.close()


def executor(recipe: Recipe, ex: Execution, listener):
    """Worker processes over every visible GPU (`cuda`), or several on one device when asked for
    (`--workers-per-gpu N` with cpu or cuda:N); this process otherwise."""
    if ex.device == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise MuaError("no CUDA GPU is visible")
        if len(devices) > 1 or workers_per_gpu(ex, 0) != 1:
            return PoolExecutor(recipe, ex, listener, devices)
        ex = dataclasses.replace(ex, device="cuda:0")
    elif ex.workers_per_gpu > 1:
        return PoolExecutor(recipe, ex, listener, [ex.device])
    return LocalExecutor(recipe, ex, listener)
