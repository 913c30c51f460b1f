"""Built units of batched trials, kept between units of one device for the next unit of the same shape.

Building K stacked trials (peft, the copy of the base, the kernels' preparation) and, on a GPU, running the
warm-up steps and capturing the step as a CUDA graph cost more than the 100 steps of a small model's unit
(docs/performance.md). A later unit of the same (regime, rank, K, graphs) takes a kept one, re-initializes it
in place (batched.Batched.reset: its seed's init, fresh optimizer state, its LRs) and replays the captured step.

What is kept is bounded in bytes: the room the sweep's memory plan leaves beside the largest units it has queued
or running (sweep/memory.py), so the bound moves as they do; past it, the unit given back longest ago is freed
first. Knows units only as objects with `close()`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class WarmUnits:
    """Idle built units by shape, for any slot of one device (thread-safe). `size(shape)`: a unit's bytes."""

    def __init__(self, capacity: int = 0, size: Callable[[Hashable], int] = lambda shape: 0):
        self.capacity, self.size = capacity, size
        self._idle: OrderedDict[tuple, object] = OrderedDict()  # (shape, serial) → unit, least recent first
        self._held = 0
        self._serial = 0
        self._lock = threading.Lock()
        self.taken = 0  # units handed out again: what the cache saved, counted
        self.freed = 0  # units freed: no room beside the others, memory ran out, or the sweep ended

    def take(self, shape: Hashable):
        """An idle unit of `shape` (the caller now owns it), or None. First frees what a smaller bound (resize)
        no longer has room for, before the caller builds a unit in that memory."""
        found = None
        with self._lock:
            for key in reversed(self._idle):  # the most recent: its memory is the likeliest still in cache
                if key[0] == shape:
                    self._held -= self.size(shape)
                    self.taken += 1
                    found = self._idle.pop(key)
                    break
            freed = self._trim(0)
            self.freed += len(freed)
        for u in freed:
            u.close()
        return found

    def give(self, shape: Hashable, unit) -> None:
        """Keeps `unit` for a later one of its shape, or frees it where it would not fit beside what is kept
        (what was given back longest ago goes first)."""
        need = self.size(shape)
        with self._lock:
            fits = need <= self.capacity
            freed = self._trim(need if fits else 0)  # and what a smaller bound (resize) no longer has room for
            if fits:
                self._serial += 1
                self._idle[(shape, self._serial)] = unit
                self._held += need
            else:
                freed.append(unit)
            self.freed += len(freed)
        for u in freed:
            u.close()

    def resize(self, capacity: int) -> None:
        """A new bound in bytes. What no longer fits is freed by the next take or give, in a thread that runs
        units on this device (as give's own frees are), not in the sweep's main thread that resizes."""
        with self._lock:
            self.capacity = capacity

    def _trim(self, need: int) -> list:
        """Idle units taken out, the least recent first, until `need` more bytes fit (under the lock)."""
        out = []
        while self._idle and self._held + need > self.capacity:
            key, old = self._idle.popitem(last=False)
            self._held -= self.size(key[0])
            out.append(old)
        return out

    def clear(self) -> None:
        """Frees every kept unit (before a retry that needs the memory, and when the sweep ends)."""
        with self._lock:
            units, self._idle, self._held = list(self._idle.values()), OrderedDict(), 0
            self.freed += len(units)
        for u in units:
            u.close()

    def __len__(self) -> int:
        return len(self._idle)
