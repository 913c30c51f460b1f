"""The first round runs every other LR of the grid; `fill` adds the grid's LRs the local fit reads around each
best, so that the fit sees what the whole grid would show it there."""

import math

import numpy as np
import pytest

from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import coarse, fill, grid_plan, plan

GRID = [2.0**k for k in range(-10, -3)]  # 2^-10 … 2^-4, as recipes/tiny.yaml


def lrs(values) -> list[float]:
    return sorted(round(math.log2(v), 6) for v in values)


def test_coarse_keeps_every_other_lr_of_a_long_grid():
    assert lrs(coarse(GRID)) == [-9, -7, -5]
    assert lrs(coarse(GRID[1:])) == [-8, -6, -4]  # an even grid: its top end is one of them
    assert coarse(GRID[:5]) == GRID[:5]  # too short to thin
    sparse = [2.0**k for k in range(-13, 3, 3)]
    assert coarse(sparse) == sparse  # LRs 3 octaves apart: every other one would be 6 apart


def test_plan_is_the_coarse_round_with_refine_and_the_grid_without(micro_recipe_path):
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-10:2^-4", seeds=2)
    assert lrs({s.lr for s in plan(recipe)}) == [-9, -7, -5] and len(plan(recipe)) == 6
    assert len(grid_plan(recipe)) == 14
    whole = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-10:2^-4", refine=0)
    assert plan(whole) == grid_plan(whole)


def test_fill_adds_the_grid_lrs_inside_the_window_of_the_best():
    m = {2.0**-9: [4.0], 2.0**-7: [1.0], 2.0**-5: [3.0]}
    # refinement will add 2^-7.5 and 2^-6.5: with 2^-8 and 2^-6 they are the window's two LRs a side
    assert lrs(fill(m, GRID, refine=True)) == [-8, -6]
    assert lrs(fill(m, GRID, refine=False)) == [-8, -6]  # 2^-9 and 2^-5 are its second LRs a side


def test_fill_without_refinement_reads_two_lrs_a_side():
    m = {2.0**-7: [1.0], 2.0**-8: [2.0], 2.0**-6: [2.0]}
    assert lrs(fill(m, GRID, refine=False)) == [-9, -5]
    # with refinement to come, its half-octave LRs are the second LRs a side, and the window's edges wait for it
    assert fill(m, GRID, refine=True) == []


def test_fill_follows_the_best_to_a_half_octave_lr():
    m = {2.0**x: [(x + 6.5) ** 2] for x in (-9, -8, -7.5, -7, -6.5, -6, -5.5)}
    # the best is 2^-6.5; its window reaches 2^-5, and nothing run lies at or above the window's top (2^-5)
    assert lrs(fill(m, GRID, refine=True)) == [-5]


def test_fill_adds_the_grid_lr_beyond_a_window_edge_nothing_run_reaches():
    m = {2.0**x: [(x + 8.0) ** 2] for x in (-9, -8.5, -8, -7.5, -7, -5)}
    # window 2^-9.5 … 2^-6.5: the fit looks for η* from the lowest LR run, so 2^-10 is run for its lower end
    assert lrs(fill(m, GRID, refine=True)) == [-10]


def test_fill_counts_a_diverged_lr_as_run_but_not_as_read():
    m = {2.0**-9: [3.0], 2.0**-7: [1.0], 2.0**-6.5: [1.5], 2.0**-7.5: [1.5], 2.0**-6: [math.inf], 2.0**-8: [2.0]}
    # above the best only 2^-6.5 is finite: the window reads up to two finite LRs a side, so 2^-5 may be read
    assert lrs(fill(m, GRID, refine=True)) == [-5]
    assert fill({2.0**-9: [math.inf], 2.0**-7: [math.inf]}, GRID, refine=True) == []  # the extension looks lower


def test_fill_adds_nothing_once_the_window_is_run():
    m = {2.0**x: [(x + 7) ** 2] for x in (-9, -8, -7.5, -7, -6.5, -6, -5)}
    assert fill(m, GRID, refine=True) == []


def _synthetic(spec, *args, **kwargs):
    """A deterministic loss: each (regime, rank) its own optimum and curvature, steeper above the optimum,
    a seed shift, noise enough that some groups get another seed, and divergence 3 octaves above the optimum."""
    from mua_cli.spec.trial import TrialResult

    x = math.log2(spec.lr)
    opt = {"A:r": -5.2, "B:1": -6.4 - 0.4 * math.log2(spec.rank / 4)}[spec.regime]
    if x > opt + 3:
        return TrialResult("diverged", math.inf)
    d = x - opt
    noise = 0.03 * np.random.default_rng(abs(hash((spec.lr, spec.rank, spec.seed, spec.regime == "B:1")))).normal()
    return TrialResult("ok", 2.0 + 0.05 * d * d * (2.5 if d > 0 else 1.0) + 0.05 * spec.seed + noise)


def test_a_filled_sweep_fits_as_the_whole_grid_would(micro_recipe_path, tmp_path, monkeypatch):
    """The sweep runs fewer trials than the grid holds, and every η* and interval is the one the fit gives with
    the rest of the grid run as well."""
    from mua_cli.science.fit import fit_run
    from mua_cli.sweep.plan import meta
    from mua_cli.sweep.sizing import Execution
    from mua_cli.sweep.store import TrialStore, load_trials
    from mua_cli.sweep.stream import run_sweep
    from mua_cli.train import loop as train

    monkeypatch.setattr(train, "_train", _synthetic)
    recipe = load_recipe(str(micro_recipe_path), ranks="2,4,16", regimes="A:r,B:1", lrs="2^-12:2^-2", max_extend=1)
    run = tmp_path / "run"
    run_sweep(recipe, run, "cpu", execution=Execution("cpu", batch_trials=1))
    swept = load_trials(run)
    assert swept["key"].is_unique and swept["lr"].nunique() > 3
    have = set(swept["key"])
    rest = [s for s in grid_plan(recipe) if s.key not in have]
    assert len(rest) >= len(grid_plan(recipe)) // 3  # a third of the grid or more was never needed
    fitted = {(o.regime, o.rank): o for o in fit_run(swept).optima}
    store = TrialStore.create(run)
    for spec in rest:
        store.add(spec, _synthetic(spec), meta(recipe, spec))
    whole = {(o.regime, o.rank): o for o in fit_run(load_trials(run)).optima}
    assert fitted.keys() == whole.keys() and len(fitted) == 6
    for key, o in whole.items():
        assert o.usable, (key, o.reason)
        got = fitted[key]
        assert (got.log2_lr_star, got.lo, got.hi) == pytest.approx((o.log2_lr_star, o.lo, o.hi), abs=1e-9), key
    again = run_sweep(recipe, tmp_path / "again", "cpu", execution=Execution("cpu", batch_trials=1))
    assert again.ran == len(swept)  # the same decisions from the same trials
    assert run_sweep(recipe, run, "cpu", execution=Execution("cpu", batch_trials=1)).ran == 0


class FakeSlots:
    """Slots that train nothing: each result from `loss`, handed back last-queued first (so that the groups'
    trials come back interleaved, as from several slots), and the trials that may ride along run too where
    `ride`. `log`: what was submitted and what came back, in order."""

    def __init__(self, loss, ride=False):
        self.loss, self.ride, self.queue, self.log, self.ran = loss, ride, [], [], []

    def submit(self, specs, spare=()):
        units = [[s] for s in [*specs, *(spare if self.ride else ())]]
        self.log.append(("submit", [s for s in specs]))
        self.queue.extend(s for u in units for s in u)
        return units

    def next(self):
        spec = self.queue.pop()
        self.ran.append(spec.key)
        self.log.append(("done", spec))
        return spec, self.loss(spec)

    def close(self, interrupted=False): ...


def _streamed(recipe, run, slots):
    from mua_cli.sweep.sizing import Execution
    from mua_cli.sweep.store import TrialStore
    from mua_cli.sweep.stream import Listener, Sweep, SweepSummary

    store = TrialStore.create(run)
    sweep = Sweep(recipe, store, store.keys(final_only=True), SweepSummary(run), Listener(), Execution())
    sweep.stream(slots, sweep.start())
    return sweep


def _by_rounds(recipe, run, loss):
    """Round by round, as a shared study's planner decides: every round's trials in before the next is planned."""
    from mua_cli.sweep.plan import Planner, meta
    from mua_cli.sweep.store import TrialStore, frame

    store, planner = TrialStore.create(run), Planner(recipe, set())
    pending = planner.first()
    while pending:
        for spec in pending:
            result = loss(spec)
            store.add(spec, result, meta(recipe, spec))
            planner.done.add(spec.key)
            planner.record(spec, result)
        pending = planner.next_round(lambda: frame(store))


@pytest.mark.parametrize("extra", [dict(), dict(seeds=2), dict(max_extend=2, lrs="2^-11:2^-7")])
def test_the_stream_asks_for_what_the_rounds_ask_for(micro_recipe_path, tmp_path, extra):
    """Each group moves on as soon as its own trials are in, the others' still running: the same trials, every
    extension, refinement and extra seed, and so the same fit, as round by round."""
    from mua_cli.science.fit import fit_run
    from mua_cli.sweep.store import load_trials

    kw = dict(ranks="2,4,16", regimes="A:r,B:1", lrs="2^-12:2^-2", max_extend=1) | extra
    recipe = load_recipe(str(micro_recipe_path), **kw)
    slots = FakeSlots(_synthetic)
    sweep = _streamed(recipe, tmp_path / "stream", slots)
    _by_rounds(recipe, tmp_path / "rounds", _synthetic)
    streamed, rounds = load_trials(tmp_path / "stream"), load_trials(tmp_path / "rounds")
    assert sorted(streamed["key"]) == sorted(rounds["key"]) and streamed["key"].is_unique
    assert any(spec.seed >= recipe.sweep.seeds for _, specs in slots.log if _ == "submit" for spec in specs)
    fit = {(o.regime, o.rank): (o.lr_star, o.lo, o.hi) for o in fit_run(streamed).optima}
    assert fit == {(o.regime, o.rank): (o.lr_star, o.lo, o.hi) for o in fit_run(rounds).optima}
    # it streamed: some group's next trials were queued while another group's first round was still out
    first = {s.key for s in plan(recipe)}
    out, early = set(first), False
    for what, x in slots.log[1:]:
        if what == "done":
            out.discard(x.key)
        elif out:
            early = True
    assert early
    assert sweep.summary.ran == len(streamed)
    again = FakeSlots(_synthetic)  # resumed when finished: nothing runs, nothing is added
    assert _streamed(recipe, tmp_path / "stream", again).summary.ran == 0 and again.ran == []


def test_trials_that_rode_along_are_stored_only_when_asked_for(micro_recipe_path, tmp_path):
    """A batched pass takes the grid's other LRs along; the store gets exactly the trials the planner asks for,
    those it asks for later come from what rode along without running again, and the rest are dropped."""
    from mua_cli.sweep.store import load_trials

    recipe = load_recipe(str(micro_recipe_path), ranks="2,16", regimes="A:r,B:1", lrs="2^-12:2^-2", max_extend=1)
    plain, riding = FakeSlots(_synthetic), FakeSlots(_synthetic, ride=True)
    _streamed(recipe, tmp_path / "plain", plain)
    _streamed(recipe, tmp_path / "riding", riding)
    a, b = load_trials(tmp_path / "plain"), load_trials(tmp_path / "riding")
    assert sorted(a["key"]) == sorted(b["key"]) and b["key"].is_unique
    assert len(riding.ran) == len(set(riding.ran))  # nothing ran twice
    asked = [s.key for what, specs in riding.log if what == "submit" for s in specs]
    assert len(asked) < len(b)  # some of what the planner asked for was in already, and was not queued
    assert set(riding.ran) - set(b["key"])  # and some that rode along was never asked for: not stored


def test_expected_total_guesses_the_default_sweep(micro_recipe_path):
    from mua_cli.sweep.plan import expected_total

    tiny = load_recipe("tiny")
    assert expected_total(tiny) == 51  # it runs 52 (benchmarks/default_plan.json)
    whole = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-10:2^-4", refine=0)
    assert expected_total(whole) == len(grid_plan(whole))
