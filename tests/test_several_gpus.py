"""N GPUs simulated on the CPU: `torch.cuda.device_count` says N, and every `cuda:i` slot's trainer is a real one
on the CPU, so the pool runs one thread slot per GPU, as it does on a machine of N GPUs (pool.py), and trains for
real. The sweep must store the same trials, and the fit find the same η*, as on one device; units must go to
whichever slot is free, the costliest first."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from mua_cli.sweep.sizing import Execution, UnitCosts, units
from mua_cli.sweep.trainer import Trainer


class CpuAsGpu:
    """A real trainer on the CPU standing in for GPU `device`: its results say which slot ran them."""

    def __init__(self, real: Trainer, device: str):
        self.real, self.device = real, device

    @classmethod
    def load(cls, recipe, device, on_note=None, graphs=True, fused=True):
        return cls(Trainer.load(recipe, "cpu", on_note, False, False), device)

    def __getattr__(self, name):  # n_params, notes, memory, has_dropout, on_note
        return getattr(self.real, name)

    def run_unit(self, unit, on_step=None, on_note=None):
        results = self.real.run_unit(unit, on_step, on_note)
        for r in results:
            r.device = self.device
        return results

    def close(self):
        self.real.close()


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: n simulated GPUs from here on."""
    import torch

    monkeypatch.setattr("mua_cli.sweep.pool.Trainer", CpuAsGpu)
    monkeypatch.setattr("mua_cli.sweep.slots.Trainer", CpuAsGpu)
    monkeypatch.setattr("mua_cli.sweep.memory.usable_bytes", lambda device: 80 * 2**30)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda d: SimpleNamespace(synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: device)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    return lambda n: monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def _sweep(recipe, folder, n_gpus, gpus):
    from mua_cli.api import fit
    from mua_cli.sweep.store import load_trials
    from mua_cli.sweep.stream import run_sweep

    if n_gpus:
        gpus(n_gpus)
        ex = Execution("cuda", workers_per_gpu=1, batch_trials=1, fused_kernels=False)
        run_sweep(recipe, folder, "cuda", execution=ex)
    else:  # this process alone, on the CPU: the reference
        run_sweep(recipe, folder, "cpu", execution=Execution("cpu", workers_per_gpu=1, batch_trials=1))
    df = load_trials(folder).sort_values("key").reset_index(drop=True)
    optima = {(o.regime, o.rank): (o.lr_star, o.best_grid_lr, o.edge) for o in fit(folder).optima}
    return df, optima


@pytest.mark.slow
def test_two_gpus_store_the_trials_and_find_the_lrs_of_one(micro_recipe_path, tmp_path, gpus):
    """The whole adaptive sweep (grid, fill, extension) on one device and on 2 simulated GPUs: the same
    trials, the same metrics (each trial is seeded by its key, whatever slot runs it), the same η*; every GPU ran
    trials."""
    from mua_cli.spec.recipe import load_recipe

    recipe = load_recipe(str(micro_recipe_path)).replace(steps=8)
    ref, ref_optima = _sweep(recipe, tmp_path / "one", 0, gpus)
    assert len(ref) >= 20 and any(lr is not None for lr, _, _ in ref_optima.values())
    df, optima = _sweep(recipe, tmp_path / "two", 2, gpus)
    assert list(df["key"]) == list(ref["key"]) and list(df["status"]) == list(ref["status"])
    assert df["metric"].to_numpy() == pytest.approx(ref["metric"].to_numpy(), rel=1e-6, nan_ok=True)
    assert optima == ref_optima
    assert set(df["device"]) == {"cuda:0", "cuda:1"}  # both GPUs took units


class Timed:
    """A trainer that trains nothing: each unit sleeps for its cost (a full trial 10× a LoRA one) and is recorded,
    with its start and end, per slot."""

    log: list = []
    room: dict = {}  # device → the (slots, K) its kept units were last given room beside (Trainer.size_kept)
    n_params = 5_000_000
    notes: tuple = ()
    has_dropout = False
    LORA_S = 0.04

    def __init__(self, device):
        self.device, self.on_note, self.warm = device, None, None

    def keep_warm(self, slots, k, shared=None):
        return shared

    def size_kept(self, slots, k):
        self.room[self.device] = (slots, k)  # one cache per GPU, as the slots of a real one share

    @classmethod
    def load(cls, recipe, device, on_note=None, graphs=True, fused=True):
        return cls(device)

    def memory(self, rank):
        from mua_cli.sweep.memory import TrialMemory

        return TrialMemory(base=2**20, fixed=2**20, per_trial=2**20, parts={"activations": 2**20})

    def run_unit(self, unit, on_step=None, on_note=None):
        from mua_cli.spec.trial import TrialResult

        started = time.time()
        time.sleep(sum(10 * self.LORA_S if s.regime == "full" else self.LORA_S for s in unit))
        finished = time.time()
        self.log.append((self.device, [s.key for s in unit], started, finished, self.room.get(self.device)))
        info = {"started_at": started, "finished_at": finished}
        return [TrialResult("ok", 1.0, device=self.device, info=dict(info)) for _ in unit]

    def close(self): ...


def _specs(recipe, n_lora: int, n_full: int):
    from mua_cli.sweep.grid import make_spec

    lora = [make_spec(recipe, "A:r", 2, 2.0 ** (-12 + i / 4), 0) for i in range(n_lora)]
    return lora + [make_spec(recipe, "full", 0, 2.0 ** (-12 + i / 4), 0) for i in range(n_full)]


def test_units_of_unequal_cost_spread_over_the_gpus_costliest_first(micro_recipe_path, gpus, monkeypatch):
    """10 LoRA trials then a full one (10× the cost) on 2 GPUs, one trial per unit: the full trial is queued
    first, whatever order it was asked in, so one GPU runs it while the other runs the LoRA trials, and both end
    together. Queued as asked, the GPUs would share the LoRA trials, then one would run the full trial alone
    (ends 0.4 s apart)."""
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.pool import Pool

    recipe = load_recipe(str(micro_recipe_path))
    monkeypatch.setattr("mua_cli.sweep.pool.Trainer", Timed)
    Timed.log = []
    ex = Execution("cuda", workers_per_gpu=1, batch_trials=1)
    pool = Pool.start(recipe, ex, SimpleNamespace(note=lambda m: None), ["cuda:0", "cuda:1"], Timed("cuda:0"))
    try:
        specs = _specs(recipe, 10, 1)
        queued = pool.submit(specs)
        assert [u[0].regime for u in queued] == ["full"] + ["A:r"] * 10
        done = [pool.next() for _ in specs]
    finally:
        pool.close()
    assert sorted(s.key for s, _ in done) == sorted(s.key for s in specs)
    ends = {d: max(e for dd, _, _, e, _ in Timed.log if dd == d) for d in ("cuda:0", "cuda:1")}
    per_gpu = {d: sum(1 for dd, *_ in Timed.log if dd == d) for d in ends}
    assert min(per_gpu.values()) >= 1 and sum(per_gpu.values()) == 11
    # 0.4 s of work each: a slot ends late by at most its last LoRA unit (0.04 s) and a shared machine's noise
    assert abs(ends["cuda:0"] - ends["cuda:1"]) < 0.2
    # measured seconds now rank the shapes: the full unit is dearer than the LoRA one
    full, lora = [[s] for s in specs[-1:]], [[s] for s in specs[:1]]
    assert pool.costs.seconds(full[0]) > 2 * pool.costs.seconds(lora[0])


def test_unit_costs_start_from_the_estimate_and_follow_the_measurement(micro_recipe_path):
    """Before anything ran: trials × steps × model size, full trials dearer. After: the measured seconds of a
    shape, and a shape not yet run scaled by what the estimate proved to be worth."""
    from mua_cli.spec.recipe import load_recipe

    recipe = load_recipe(str(micro_recipe_path))
    specs = _specs(recipe, 8, 2)
    costs = UnitCosts(recipe, 1_000)
    eight, one, full = units(specs[:8], recipe, 8), [specs[:1]], [specs[8:9]]
    assert costs.seconds(eight[0]) == 8 * recipe.optim.steps * 1_000
    assert costs.seconds(full[0]) > costs.seconds(one[0])
    assert costs.longest_first([one[0], full[0], eight[0]]) == [eight[0], full[0], one[0]]
    costs.record(eight[0], 2.0)  # a batched pass of 8: much cheaper than 8 trials one by one
    assert costs.seconds(eight[0]) == 2.0
    assert costs.seconds(one[0]) == pytest.approx(2.0 / 8)  # the estimate, scaled as the measured unit's was
    costs.record(one[0], 1.5)  # but one trial alone turned out to cost most of the pass
    assert costs.seconds(one[0]) == 1.5
    # the full trial, not yet run, is worth 3 trials one by one as the last measurement says (the upper median)
    assert costs.seconds(full[0]) == pytest.approx(3 * 1.5)
    assert costs.longest_first([one[0], full[0], eight[0]]) == [full[0], eight[0], one[0]]


def test_a_group_is_split_over_the_idle_gpus(micro_recipe_path, monkeypatch, gpus):
    """One group of 8 LRs, batched up to 16 a pass, on 4 idle GPUs: 4 units of 2, not one of 8, and every GPU
    takes one; once every GPU is busy, a group queued next is one full pass."""
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.grid import make_spec
    from mua_cli.sweep.pool import Pool

    recipe = load_recipe(str(micro_recipe_path))
    monkeypatch.setattr("mua_cli.sweep.pool.Trainer", Timed)
    Timed.log = []
    ex = Execution("cuda", workers_per_gpu=1, batch_trials=16)
    devices = [f"cuda:{i}" for i in range(4)]
    pool = Pool.start(recipe, ex, SimpleNamespace(note=lambda m: None), devices, Timed("cuda:0"))
    try:
        first = _specs(recipe, 8, 0)
        assert [len(u) for u in pool.submit(first)] == [2, 2, 2, 2]
        second = [make_spec(recipe, "B:1", 8, s.lr, 0) for s in first]
        assert [len(u) for u in pool.submit(second)] == [8]  # every GPU busy: nothing to split for
        for _ in first + second:
            pool.next()
    finally:
        pool.close()
    assert len({d for d, keys, *_ in Timed.log if len(keys) == 2}) >= 2  # taken by whichever slots were free


def test_kept_units_get_the_room_beside_the_largest_unit_queued_or_running(micro_recipe_path, monkeypatch, gpus):
    """Two slots on one GPU, up to 4 trials a pass: while units of 4 are queued or running, the kept units get
    the room beside units of 4, set before any of them runs; once those are done and only single trials follow
    (an adaptive sweep's later rounds), the room beside single trials, which is larger."""
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.pool import Pool

    recipe = load_recipe(str(micro_recipe_path))
    monkeypatch.setattr("mua_cli.sweep.pool.Trainer", Timed)
    Timed.log, Timed.room = [], {}
    ex = Execution("cuda", workers_per_gpu=2, batch_trials=4)
    pool = Pool.start(recipe, ex, SimpleNamespace(note=lambda m: None), ["cuda:0"], Timed("cuda:0"))
    try:
        first = _specs(recipe, 8, 0)
        assert [len(u) for u in pool.submit(first)] == [4, 4]
        for _ in first:
            pool.next()
        assert Timed.room["cuda:0"] == (2, 1)  # nothing queued or running: room beside one trial
        lone = _specs(recipe, 10, 0)[8:]
        assert [len(u) for u in pool.submit(lone)] == [1, 1]
        for _ in lone:
            pool.next()
    finally:
        pool.close()
    assert [(len(keys), room) for _, keys, _, _, room in Timed.log] == [(4, (2, 4))] * 2 + [(1, (2, 1))] * 2
