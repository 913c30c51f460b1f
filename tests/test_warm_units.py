"""A built unit of batched trials, kept and reset for the next unit of its shape (train/warm.py), must train
exactly what a newly built unit trains: other LRs, another seed, after trials that diverged, a classifier's head."""

from __future__ import annotations

import gc
import weakref

import pytest
import tiny_hf as T
import torch
import yaml

import mua_cli.train.batched as batched
from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import make_spec
from mua_cli.sweep.trainer import Trainer
from mua_cli.train.batched import run_batched
from mua_cli.train.warm import WarmUnits

BIG = 2**40  # bytes: room for every unit these tests keep


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from conftest import TINY_TEST_RECIPE

    p = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    p.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    return load_recipe(str(p)).replace(divergence_factor=1.05)


def _same(fresh, reused) -> None:
    assert [r.status for r in reused] == [r.status for r in fresh]
    for a, b in zip(fresh, reused, strict=True):
        assert b.loss_curve == a.loss_curve  # bit for bit: the same arithmetic on the same values
        assert (b.metric, b.eval_loss) == (a.metric, a.eval_loss)


@pytest.mark.parametrize("regime,rank", [("A:r", 8), ("B:1", 2)])
def test_a_kept_unit_trains_what_a_new_one_trains(micro, regime, rank):
    runner = Trainer.load(micro, "cpu")
    first = [make_spec(micro, regime, rank, lr, 0) for lr in (2.0**-6, 2.0**-3, 2.0**7)]  # the last diverges
    then = [make_spec(micro, regime, rank, lr, 1) for lr in (2.0**-9, 2.0**-5, 2.0**-4)]  # another seed, LRs
    again = [make_spec(micro, regime, rank, lr, 0) for lr in (2.0**-8, 2.0**-7, 2.0**-2)]  # the first seed again
    warm = WarmUnits(BIG)
    assert run_batched(first, runner.base, runner.data, micro, "cpu", warm=warm)[-1].status == "diverged"
    assert len(warm) == 1
    for specs in (then, again):
        reused = run_batched(specs, runner.base, runner.data, micro, "cpu", warm=warm)
        assert all(r.info.get("warm_unit") and (r.info["kept_idle"], r.info["kept_freed"]) == (1, 0) for r in reused)
        _same(run_batched(specs, runner.base, runner.data, micro, "cpu"), reused)
    assert warm.taken == 2 and len(warm) == 1


def test_only_a_unit_of_the_same_shape_is_reused(micro):
    runner = Trainer.load(micro, "cpu")
    warm = WarmUnits(BIG)
    run_batched([make_spec(micro, "A:r", 8, lr, 0) for lr in (2.0**-6, 2.0**-5)], runner.base, runner.data, micro,
                "cpu", warm=warm)  # fmt: skip
    for regime, rank, n in [("A:r", 8, 3), ("A:r", 2, 2), ("B:1", 8, 2)]:  # another K, rank or regime
        out = run_batched([make_spec(micro, regime, rank, 2.0**-6 + i * 1e-3, 0) for i in range(n)], runner.base,
                          runner.data, micro, "cpu", warm=warm)  # fmt: skip
        assert not any(r.info.get("warm_unit") for r in out)
    assert warm.taken == 0 and len(warm) == 4


def test_a_classifier_head_starts_again_from_the_base(tmp_path):
    model, data = T.bert(tmp_path / "model"), T.cls_csv(tmp_path / "d.csv")
    recipe = load_recipe(str(T.recipe_yaml(tmp_path / "r.yaml", model=str(model), data=str(data), task="seq-cls",
                                           label_field="sentiment")))  # fmt: skip
    recipe = recipe.replace(steps=8, eval_fraction=0.25)
    runner = Trainer.load(recipe, "cpu")
    for m in runner.base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    runner.data.fixed_shape = True
    warm = WarmUnits(BIG)
    run_batched([make_spec(recipe, "B:1", 2, lr, 0) for lr in (2.0**-5, 2.0**-3)], runner.base, runner.data, recipe,
                "cpu", warm=warm)  # fmt: skip
    specs = [make_spec(recipe, "B:1", 2, lr, 1) for lr in (2.0**-8, 2.0**-6)]
    reused = run_batched(specs, runner.base, runner.data, recipe, "cpu", warm=warm)
    assert reused[0].info.get("warm_unit")
    _same(run_batched(specs, runner.base, runner.data, recipe, "cpu"), reused)
    assert reused[0].info["eval_accuracy"] is not None


class _Unit:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_what_is_kept_stays_within_its_bytes_least_recent_freed_first():
    warm = WarmUnits(capacity=10, size=lambda shape: shape[1])
    a, b, c, huge = _Unit(), _Unit(), _Unit(), _Unit()
    warm.give(("a", 4), a)
    warm.give(("b", 4), b)
    warm.give(("c", 4), c)  # 12 > 10: a, given back first, goes
    assert a.closed and not b.closed and not c.closed and len(warm) == 2
    warm.give(("huge", 11), huge)  # larger than everything allowed: freed at once, nothing else goes
    assert huge.closed and len(warm) == 2 and warm.freed == 2  # a and huge: counted, so a sweep can say why
    assert warm.take(("b", 4)) is b and warm.take(("b", 4)) is None and warm.taken == 1
    warm.clear()
    assert c.closed and len(warm) == 0 and not b.closed and warm.freed == 3  # b is its taker's now
    assert WarmUnits().take(("b", 4)) is None  # no capacity: nothing is ever kept


def test_a_sweep_that_keeps_units_stores_what_one_that_builds_each_stores(micro, tmp_path, monkeypatch):
    """The whole adaptive sweep (grid, fill, refinements), batched in units of up to 3 trials, once building
    every unit and once keeping them (as a GPU does; the CPU keeps none by default): the same trials, bit for
    bit (a lone trial up to rounding: where units are kept it runs as a unit of one), and some units were taken
    again."""
    import math

    from mua_cli.sweep.sizing import Execution
    from mua_cli.sweep.store import load_trials
    from mua_cli.sweep.stream import run_sweep

    micro = micro.replace(lrs="2^-9:2^-4", divergence_factor=3.0)
    ex = Execution("cpu", workers_per_gpu=1, batch_trials=3)
    run_sweep(micro, tmp_path / "built", "cpu", execution=ex)
    monkeypatch.setattr("mua_cli.sweep.memory.warm_capacity", lambda trainer, slots, k: BIG)
    run_sweep(micro, tmp_path / "kept", "cpu", execution=ex)
    built, kept = (load_trials(tmp_path / n).sort_values("key").reset_index(drop=True) for n in ("built", "kept"))
    assert list(kept["key"]) == list(built["key"]) and len(built) > 12  # the grid, then what the planner added
    assert list(kept["status"]) == list(built["status"])
    lone = [(i or {}).get("batched_with") is None for i in built["info"]]
    assert any(lone)  # a lone trial runs on its own where none is kept, as a kept unit of one where units are
    for a, b, alone in zip(built["metric"], kept["metric"], lone, strict=True):  # bit for bit, but up to rounding
        assert a == pytest.approx(b, rel=1e-4, nan_ok=True) if alone else (a == b or math.isnan(a) and math.isnan(b))
    reused = [bool((i or {}).get("warm_unit")) for i in kept["info"]]
    assert any(reused) and not any(bool((i or {}).get("warm_unit")) for i in built["info"])


def test_a_unit_is_freed_when_dropped_without_the_garbage_collector(micro, monkeypatch):
    """A unit's K models (on a GPU, and its graph's memory) go as soon as nothing holds the unit: once run where
    none is kept, and once freed from the kept ones, not at the collector's next full pass, which a GPU whose
    memory is capped does not wait for."""
    models = []
    build = batched.Batched.__init__

    def tracked(self, *args, **kwargs):
        build(self, *args, **kwargs)
        models.append(weakref.ref(self.model))

    monkeypatch.setattr(batched.Batched, "__init__", tracked)
    runner = Trainer.load(micro, "cpu")
    specs = [make_spec(micro, "B:1", 2, lr, 0) for lr in (2.0**-6, 2.0**-5)]
    warm = WarmUnits(BIG)
    gc.collect()
    gc.disable()
    try:
        run_batched(specs, runner.base, runner.data, micro, "cpu")
        run_batched(specs, runner.base, runner.data, micro, "cpu", warm=warm)
        assert models[0]() is None and models[1]() is not None  # the kept one lives on
        warm.clear()
        assert models[1]() is None
    finally:
        gc.enable()


def test_a_slot_shares_its_gpus_kept_units_even_while_none_is_kept(micro):
    """The second slot on a GPU joins the first's cache when it starts, before any unit is kept: an empty cache
    is still the one to share (a falsy empty one made each slot its own, so a unit found its shape only when it
    ran on the slot that built it)."""
    first, second = Trainer.load(micro, "cpu"), Trainer.load(micro, "cpu")
    shared = first.keep_warm(2, 3)
    assert len(shared) == 0 and second.keep_warm(2, 3, shared) is shared
    assert Trainer.load(micro, "cpu").keep_warm(2, 3) is not shared  # without `shared`: a cache of its own


def test_only_the_trainer_that_made_a_gpus_cache_sizes_it(micro, monkeypatch):
    """Every slot of a GPU is told the room (Pool sizes them all); the cache follows its maker. A cache that no
    keep_warm set up (a first trainer a test hands the pool as is) keeps nothing, whoever shares it: its units
    have no size, so room given to it would be unbounded."""
    monkeypatch.setattr("mua_cli.sweep.memory.warm_capacity", lambda trainer, slots, k: BIG // k)
    owner, other = Trainer.load(micro, "cpu"), Trainer.load(micro, "cpu")
    other.keep_warm(2, 3, owner.warm)
    for t in (owner, other):
        t.size_kept(2, 1)
    assert owner.warm.capacity == 0
    shared = owner.keep_warm(2, 3)
    other.keep_warm(2, 3, shared)
    assert shared.capacity == BIG // 3
    other.size_kept(2, 1)
    assert shared.capacity == BIG // 3
    owner.size_kept(2, 1)
    assert shared.capacity == BIG


def test_a_lone_trial_runs_as_a_kept_unit_of_one_where_units_are_kept(micro):
    """Where built units are kept (a GPU), a one-trial unit runs batched, is kept and is reset for the next lone
    trial of its rank, and trains what the trial trains on its own; where none is kept (the CPU by default), and
    for full finetuning, it runs on its own as before."""
    from mua_cli.train.loop import run_trial

    runner = Trainer.load(micro, "cpu")
    specs = [make_spec(micro, "B:1", 2, lr, seed) for lr, seed in ((2.0**-6, 0), (2.0**-8, 1), (2.0**7, 0))]
    alone = [run_trial(s, runner.base, runner.data, micro, "cpu") for s in specs]
    assert [r.status for r in alone] == ["ok", "ok", "diverged"]
    unkept = runner.run_unit(specs[:1])[0]
    assert "batched_with" not in unkept.info and unkept.loss_curve == alone[0].loss_curve
    runner.warm = WarmUnits(BIG)
    ran = [runner.run_unit([s])[0] for s in specs]
    assert [r.info["batched_with"] for r in ran] == [1, 1, 1]
    assert [bool(r.info.get("warm_unit")) for r in ran] == [False, True, True] and len(runner.warm) == 1
    for a, b in zip(alone, ran, strict=True):
        assert b.status == a.status and len(b.loss_curve) == len(a.loss_curve)
        assert b.loss_curve == pytest.approx(a.loss_curve, rel=1e-4, abs=1e-4)
    full = runner.run_unit([make_spec(micro, "full", 0, 2.0**-8, 0)])[0]
    assert full.status == "ok" and "batched_with" not in full.info and len(runner.warm) == 1


def test_a_smaller_bound_frees_the_least_recent_units_at_the_next_take_or_give():
    """resize only sets the bound (the main thread calls it while slots may be capturing); the slot that next
    takes or gives back a unit frees what no longer fits, the least recent first, before it builds its own."""
    warm = WarmUnits(capacity=12, size=lambda shape: shape[1])
    a, b, c, d = _Unit(), _Unit(), _Unit(), _Unit()
    for name, unit in (("a", a), ("b", b), ("c", c)):
        warm.give((name, 4), unit)
    warm.resize(8)
    assert len(warm) == 3 and not a.closed
    assert warm.take(("none", 4)) is None and a.closed and not b.closed and len(warm) == 2 and warm.freed == 1
    warm.resize(4)
    warm.give(("d", 4), d)  # room for d alone: b and c go
    assert b.closed and c.closed and not d.closed and len(warm) == 1 and warm.freed == 3
    warm.resize(100)  # a larger bound keeps more
    warm.give(("a", 4), _Unit())
    assert len(warm) == 2 and warm.freed == 3
    warm.resize(4)
    huge = _Unit()
    warm.give(("huge", 11), huge)  # too large to keep, and the give still frees what the bound left over
    assert huge.closed and len(warm) == 1 and warm.freed == 5


def test_one_slot_gives_its_kept_units_the_room_beside_the_unit_it_runs(micro, monkeypatch):
    """In the main thread's one slot (slots.Inline), each unit runs with the kept units bounded by the room
    beside it, not beside the largest pass the plan allows."""
    from types import SimpleNamespace

    from mua_cli.sweep.sizing import Execution
    from mua_cli.sweep.slots import Inline

    monkeypatch.setattr("mua_cli.sweep.memory.warm_capacity", lambda trainer, slots, k: BIG // (slots * k))
    runner = Trainer.load(micro, "cpu")
    runner.keep_warm(1, 3)
    assert runner.warm.capacity == BIG // 3
    seen, run = [], runner.run_unit

    def recorded(unit, *args):
        seen.append((len(unit), runner.warm.capacity))
        return run(unit, *args)

    monkeypatch.setattr(runner, "run_unit", recorded)
    listener = SimpleNamespace(note=lambda m: None, trial_start=lambda spec: None, step=None)
    inline = Inline(micro, Execution("cpu", workers_per_gpu=1, batch_trials=3), listener, runner)
    specs = [make_spec(micro, "B:1", 2, 2.0 ** -(6 + i), 0) for i in range(4)]
    assert [len(u) for u in inline.submit(specs[:3]) + inline.submit(specs[3:])] == [3, 1]
    assert sorted(inline.next()[0].key for _ in specs) == sorted(s.key for s in specs)
    assert seen == [(3, BIG // 3), (1, BIG)]
