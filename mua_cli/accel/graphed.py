"""The training step as one CUDA graph: forward, backward, clip and optimizer replayed with one launch, where
an eager step of a small model spends most of its time launching kernels.

The step function must read and write only tensors that live as long as the trial (static inputs, the model,
the optimizer's state, its LRs as device tensors). The first WARMUP steps are real steps run eagerly on a side
stream (capture needs the allocator, cuBLAS and the optimizer's state warmed up); every later step replays the
capture. cuBLAS may pick other kernels while capturing, so losses can differ from eager ones around the 5th
digit (tests/test_gpu.py). A Step may serve several units of trials (a kept unit, train/warm.py): once
captured, every step of a later unit, its first too, is a replay.

Several threads may capture, one or two per GPU: a capture records on its thread's side stream, forbids unsafe
CUDA calls in its own thread only, and holds CAPTURE (with, where memory is short, collecting garbage and
emptying the allocator's cache), so that no two threads capture at once on one GPU. The warm-up steps run on
the same side stream, outside the lock.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend

from .attention import GRAPH_SAFE, kernels

WARMUP = 3
CAPTURE = threading.Lock()


SHORT = 0.5  # of what this process may hold on the GPU, past which a capture first empties the allocator's cache


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _memory_short(device: torch.device) -> bool:
    """Whether the allocator holds over SHORT of the GPU's memory, or of this process's cap where one is set."""
    index = _index(device)
    allowed = torch.cuda.get_device_properties(index).total_memory * torch.cuda.get_per_process_memory_fraction(index)
    return torch.cuda.memory_reserved(index) > SHORT * allowed


# Captures that failed, as (device index, pool id, the graph while it lives); appended and read under CAPTURE.
# Torch builds without pytorch#190348 never give back a failed capture's private pool, and empty_cache cannot
# free it, so every later unit on that GPU runs short.
_FAILED: list[tuple[int, tuple[int, int], weakref.ref]] = []


def _failed(graph: torch.cuda.CUDAGraph, pool: tuple[int, int], index: int) -> None:
    """`pool`: the one the capture began with (a failed graph's pool() raises)."""
    pool = tuple(pool)
    # Torch before pytorch#180395 skips ending the pool's capture when capture_end fails, and while the allocator
    # believes a capture is under way, torch.cuda.empty_cache frees nothing, in any pool (torch 2.11 on an H200:
    # docs/performance.md).
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is not None:
        with contextlib.suppress(RuntimeError, TypeError):  # a torch with the fix ended it already
            end(index, pool)
    _FAILED.append((index, pool, weakref.ref(graph)))


def empty_cache() -> None:
    """torch.cuda.empty_cache, never while another thread captures (it frees cached blocks on every GPU), and
    what failed captures still hold."""
    with CAPTURE:
        _empty_cache()


def _empty_cache() -> None:
    torch.cuda.empty_cache()
    if _FAILED and release_failed_pools():
        torch.cuda.empty_cache()


def release_failed_pools() -> int:
    """Releases each failed capture's pool that empty_cache left behind, its graph gone and none of its memory
    in use: only a reference the failed capture never dropped keeps such a pool (a torch with the fix has freed
    it already; one whose graph or memory is still in use waits for a later call). How many it released."""
    segments = torch.cuda.memory_snapshot()
    released, waiting = 0, []
    for index, pool, graph in _FAILED:
        mine = [s for s in segments if s["device"] == index and tuple(s.get("segment_pool_id", ())) == pool]
        if graph() is not None or any(s["allocated_size"] for s in mine):
            waiting.append((index, pool, graph))
        elif mine:
            with contextlib.suppress(RuntimeError):  # best effort: a pool torch will not release stays held
                torch._C._cuda_releasePool(index, pool)
                released += 1
    _FAILED[:] = waiting
    return released


_SIDE = threading.local()  # per thread, per GPU: where its warm-up steps run and its captures record


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's side stream on the GPU, for warm-up steps and captures, made once and used by this
    thread alone. Not a new torch.cuda.Stream per unit: torch hands out 32 streams a priority, round robin, so every
    32nd would be the stream another slot steps on, and that slot's work, launched while this one captured,
    would raise or be recorded into the capture instead of running (docs/performance.md). From the
    high-priority pool, apart from the slots' own streams (sweep/pool.py)."""
    streams = _SIDE.__dict__.setdefault("by_index", {})
    index = _index(device)
    if index not in streams:
        streams[index] = torch.cuda.Stream(index, priority=-1)
    return streams[index]


class Step:
    """Calls `fn` once per training step: eagerly, or (on a GPU, when `graphs`) by replaying its capture.
    A step that cannot be captured (an op that syncs with the host, say) falls back to eager, with a note.
    `attention`: SDPA's kernels for the step (attention.step_kernels: cuDNN's only for mask-free attention)."""

    def __init__(self, fn: Callable[[], None], device: str, graphs: bool, on_note: Callable[[str], None] | None,
                 attention: list[SDPBackend] = GRAPH_SAFE):  # fmt: skip
        self.fn, self.on_note, self.attention = fn, on_note, attention
        self.cuda, self.device = device.startswith("cuda"), torch.device(device)
        self.graphed = graphs and self.cuda
        self.count = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, params: list[torch.Tensor]) -> None:
        """`params`: the trainable tensors, whose gradients must be unset before capture."""
        self.count += 1
        if self.graphed:
            with torch.cuda.device(self.device):  # streams and graphs belong to the trial's GPU, not to cuda:0
                self._graphed_step(params)
        elif self.cuda:  # the same attention kernels as a graphed step: --no-cuda-graphs changes no result
            with kernels(self.attention):
                self.fn()
        else:
            self.fn()

    def _graphed_step(self, params: list[torch.Tensor]) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.count <= WARMUP:
            # Not under CAPTURE: an eager step is the same kind of work as a unit's build or evaluation, which
            # run beside another thread's thread_local capture; holding the lock kept the other slot's first
            # steps waiting (docs/performance.md, "The warm-up steps outside the capture lock").
            current, side = torch.cuda.current_stream(self.device), side_stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side), kernels(self.attention):
                self.fn()
            current.wait_stream(side)
        else:
            self._capture(params)
            if self.graph is not None:
                self.graph.replay()
            else:
                with kernels(self.attention):
                    self.fn()

    def _capture(self, params: list[torch.Tensor]) -> None:
        for p in params:
            p.grad = None  # so that backward allocates them in the graph's pool
        graph, current = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        pool = torch.cuda.graph_pool_handle()  # named here: a graph whose capture failed cannot say its pool
        # Not torch.cuda.graph: it synchronizes the whole device and empties the allocator's cache before every
        # capture, so that a slot's capture waited for the other slot's queued steps. The side stream waits
        # only for this thread's work; the cache is emptied only where memory is short.
        try:
            with CAPTURE:
                if _memory_short(self.device):
                    gc.collect()  # as torch.cuda.graph did: what only a reference cycle still holds goes first
                    _empty_cache()  # the warm-up's cached activations would sit beside the graph's
                stream = side_stream(self.device)
                stream.wait_stream(current)
                with torch.cuda.stream(stream), kernels(self.attention):
                    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                    try:
                        try:
                            self.fn()
                        except BaseException:
                            with contextlib.suppress(RuntimeError):  # the capture's own error must not hide fn's
                                graph.capture_end()
                            raise
                        graph.capture_end()
                    except BaseException:
                        _failed(graph, pool, _index(self.device))
                        if torch.cuda.is_current_stream_capturing():  # a capture torch could not end: a new stream
                            _SIDE.by_index.pop(_index(self.device), None)
                        raise
                current.wait_stream(stream)
        except torch.cuda.OutOfMemoryError:
            raise  # the caller splits the batched trials and tries again
        except RuntimeError as e:
            self.graphed = False
            for p in params:
                p.grad = None  # set during the failed capture, never computed
            if self.on_note:
                self.on_note(f"CUDA graph capture failed ({str(e).splitlines()[0]}); this trial runs eagerly")
            return
        self.graph = graph

    def close(self) -> None:
        """Frees the graph's memory pool before the next trial allocates its own."""
        if self.graph is not None:
            self.graph.reset()
            self.graph = None


def set_lrs(opt: torch.optim.Optimizer, peaks: list[float], factor: float) -> None:
    """The schedule's LR for this step: in place where the LR is a device tensor (read inside a graph)."""
    for group, peak in zip(opt.param_groups, peaks, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(peak * factor)
        else:
            group["lr"] = peak * factor
