"""accel/graphed.py's decisions that need no GPU to check (its captures and replays: tests/test_gpu.py)."""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace

import torch

from mua_cli.accel import graphed


def test_a_capture_empties_the_cache_only_where_memory_is_short(monkeypatch):
    """accel/graphed.py: past half of what this process may hold, the GPU's memory or its cap where one is set."""
    gib = 2**30
    held = {"reserved": 30 * gib, "fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: held["fraction"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: held["reserved"])
    device = torch.device("cuda", 0)
    assert not graphed._memory_short(device)  # 30 of 80 GiB
    held["fraction"] = 0.5
    assert graphed._memory_short(device)  # 30 of a 40 GiB cap
    held["reserved"] = 10 * gib
    assert not graphed._memory_short(device)


def test_a_failed_captures_pool_is_released_only_when_left_behind_unused(monkeypatch):
    """accel/graphed.py: a pool that outlived empty_cache, its graph gone and nothing of it in use, is released
    once; one whose graph or memory is still in use waits for a later call; one already freed (a torch with
    pytorch#190348) is not touched again."""
    segments = [
        {"device": 0, "segment_pool_id": (0, 7), "allocated_size": 0},  # left behind by a failed capture
        {"device": 0, "segment_pool_id": (0, 8), "allocated_size": 4096},  # a failed step's tensor still alive
        {"device": 0, "segment_pool_id": (0, 0), "allocated_size": 0},  # the ordinary cache
    ]
    released: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda i, pool: released.append((i, pool)), raising=False)

    class Graph:
        pass

    graph = Graph()  # a failed capture's graph that something still holds (an exception's frames)
    gone, alive = (lambda: None), weakref.ref(graph)
    failed = [(0, (0, 7), gone), (0, (0, 8), gone), (0, (0, 9), gone), (1, (0, 7), gone), (0, (0, 10), alive)]
    segments.append({"device": 0, "segment_pool_id": (0, 10), "allocated_size": 0})
    monkeypatch.setattr(graphed, "_FAILED", failed)
    assert graphed.release_failed_pools() == 1
    assert released == [(0, (0, 7))]
    assert [f[1] for f in graphed._FAILED] == [(0, 8), (0, 10)]
    segments[1]["allocated_size"] = 0
    del graph
    assert graphed.release_failed_pools() == 2 and released[1:] == [(0, (0, 8)), (0, (0, 10))]
    assert graphed._FAILED == []


def test_a_failed_capture_ends_its_pools_capture_and_is_recorded(monkeypatch):
    """accel/graphed.py: torch before pytorch#180395 leaves a failed capture's pool marked as being captured,
    and empty_cache then frees nothing; a torch that ended it already raises, and that is no failure."""
    ended: list[tuple] = []

    def end(index, pool):
        ended.append((index, pool))
        if len(ended) > 1:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    class Graph:
        def pool(self):  # as torch's: a graph whose capture failed has no pool to say
            raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(graphed, "_FAILED", [])
    graph = Graph()
    graphed._failed(graph, (0, 3), 1)
    graphed._failed(graph, [0, 3], 1)
    assert ended == [(1, (0, 3))] * 2
    assert [(i, p) for i, p, _ in graphed._FAILED] == [(1, (0, 3))] * 2 and graphed._FAILED[0][2]() is graph


def test_a_pool_torch_will_not_release_is_left_as_it_is(monkeypatch):
    """accel/graphed.py: the release is best effort; a torch that refuses it must not fail the unit that asked."""

    def refuse(index, pool):
        raise RuntimeError("INTERNAL ASSERT FAILED")

    left = [{"device": 0, "segment_pool_id": (0, 5), "allocated_size": 0}]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: left)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", refuse, raising=False)
    monkeypatch.setattr(graphed, "_FAILED", [(0, (0, 5), lambda: None)])
    assert graphed.release_failed_pools() == 0 and graphed._FAILED == []


def test_each_thread_steps_aside_on_one_high_priority_stream_per_gpu(monkeypatch):
    """accel/graphed.side_stream: made once per thread and GPU, from the pool the slots' own streams are not
    drawn from. A stream made per unit would, every 32nd, be another slot's (torch hands them out round robin),
    and that slot's work would meet this thread's capture."""
    made: list[tuple] = []

    class Stream:
        def __init__(self, index, priority=0):
            made.append((index, priority))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(graphed, "_SIDE", threading.local())
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    mine = [graphed.side_stream(gpu0) for _ in range(40)]
    assert all(s is mine[0] for s in mine) and graphed.side_stream(gpu1) is not mine[0]
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(graphed.side_stream(gpu0)))
    t.start()
    t.join()
    assert theirs[0] is not mine[0]
    assert made == [(0, -1), (1, -1), (0, -1)]
