"""Sweeps store every trial once, resume after an interruption, and grow the grid off its edges."""

import math

import pytest

from mua_cli.errors import MuaError
from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import extension, plan
from mua_cli.sweep.plan import EXTRA_LRS
from mua_cli.sweep.store import TrialStore, load_trials
from mua_cli.sweep.stream import Listener, run_sweep


class Interrupt(Listener):
    """Raises Ctrl-C in the middle of the n-th trial."""

    def __init__(self, after_trials: int):
        self.finished, self.after = 0, after_trials

    def trial_done(self, spec, result):
        self.finished += 1

    def step(self, step, loss):
        if self.finished == self.after and step == 3:
            raise KeyboardInterrupt


def test_interrupted_sweep_resumes_without_loss_or_duplicates(micro_recipe_path, tmp_path):
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-8:2^-6", max_extend=0)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(recipe, run, "cpu", Interrupt(after_trials=2))
    assert len(TrialStore.open(run).trials()) == 2  # the trial cut off mid-way was not stored
    summary = run_sweep(recipe, run, "cpu")
    assert summary.skipped == 2 and summary.ran == 1
    df = load_trials(run)
    assert len(df) == 3 and df["key"].is_unique
    assert sorted(df["lr"]) == [2**-8, 2**-7, 2**-6]
    again = run_sweep(recipe, run, "cpu")  # a third run finds everything done
    assert again.ran == 0 and len(load_trials(run)) == 3


def test_every_trial_records_what_the_issue_asks(micro_recipe_path, tmp_path):
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1,A:r", lrs="2^-8:2^-6", max_extend=0)
    run_sweep(recipe, tmp_path / "run", "cpu")
    df = load_trials(tmp_path / "run")
    row = df[df["regime"] == "B:1"].iloc[0]
    assert row["lora_alpha"] == 4 and not row["use_rslora"] and row["alpha"] == 1.0 and row["init"] == "B"
    row = df[df["regime"] == "A:r"].iloc[0]
    assert row["lora_alpha"] == 1 and row["alpha"] == pytest.approx(0.25) and row["init"] == "A"
    for col in ("loss_curve", "metric", "status", "wall_time", "device", "recipe", "error", "steps", "batch_size"):
        assert col in df.columns
    assert len(row["loss_curve"]) == recipe.optim.steps and row["recipe"]["steps"] == recipe.optim.steps
    ok = df[df["status"] == "ok"]
    tail = ok.iloc[0]["loss_curve"][-math.ceil(0.1 * recipe.optim.steps) :]
    assert ok.iloc[0]["metric"] == pytest.approx(sum(tail) / len(tail))
    for _, r in df.iterrows():  # where each unit's seconds went (benchmarks/sweep_timeline.py sums them)
        spent = r["info"]["phases_s"]
        assert set(spent) == {"build", "first_steps", "steps", "after"} and min(spent.values()) >= 0
        assert sum(spent.values()) == pytest.approx(r["wall_time"] * r["info"].get("batched_with", 1), abs=0.02)


def test_huge_lr_diverges_and_is_stored_as_diverged(micro_recipe_path, tmp_path):
    recipe = load_recipe(
        str(micro_recipe_path), ranks="4", regimes="A:1", lrs="2^-8,2^2,2^10", max_extend=0, alpha0=8.0
    )
    run_sweep(recipe, tmp_path / "run", "cpu")
    df = load_trials(tmp_path / "run").set_index("lr")
    assert df.loc[2**10, "status"] == "diverged" and math.isinf(df.loc[2**10, "metric"])
    assert len(df.loc[2**10, "loss_curve"]) < recipe.optim.steps  # stopped early
    assert df.loc[2**-8, "status"] == "ok"


def test_changing_steps_needs_a_new_run_folder(micro_recipe_path, tmp_path):
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-8:2^-6", max_extend=0)
    run_sweep(recipe, tmp_path / "run", "cpu")
    other = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-8:2^-6", steps=20)
    assert {s.key for s in plan(other)}.isdisjoint({s.key for s in plan(recipe)})
    with pytest.raises(MuaError, match="other settings"):
        run_sweep(other, tmp_path / "run", "cpu")
    assert len(load_trials(tmp_path / "run")) == 3


def test_extension_rules():
    grid = [2.0**-k for k in (8, 7, 6)]
    assert extension({2**-8: [1.0], 2**-7: [2.0], 2**-6: [3.0]}, grid, 2) == (2**-9, "low")
    assert extension({2**-8: [3.0], 2**-7: [2.0], 2**-6: [1.0]}, grid, 2) == (2**-5, "high")
    assert extension({2**-8: [3.0], 2**-7: [1.0], 2**-6: [math.inf]}, grid, 2) == (None, "interior")
    # the high side diverging makes a best-at-top optimum interior once the new point is in
    assert extension({2**-8: [3.0], 2**-7: [2.0], 2**-6: [1.0], 2**-5: [math.inf]}, grid, 2)[0] is None
    everything_diverged = {2**-8: [math.inf], 2**-7: [math.inf], 2**-6: [math.inf]}
    assert extension(everything_diverged, grid, 2) == (2**-9, "low")
    new, why = extension({2**-10: [0.5], 2**-9: [1.0], 2**-8: [1.5], 2**-7: [2.0], 2**-6: [3.0]}, grid, 2)
    assert new is None and "after 2 extension" in why


def test_sweep_grows_the_grid_off_an_edge(micro_recipe_path, tmp_path):
    # A grid far below the optimum: the best point is the top edge, so the sweep adds higher LRs.
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="A:r", lrs="2^-16:2^-14", max_extend=2)
    summary = run_sweep(recipe, tmp_path / "run", "cpu")
    lrs = sorted(load_trials(tmp_path / "run")["lr"])
    assert lrs == [2**-16, 2**-15, 2**-14, 2**-13, 2**-12]
    assert len(summary.added) == 2 and "high edge" in summary.added[0]
    assert summary.at_edge and "after 2 extension" in summary.at_edge[0]


def test_interrupted_pooled_sweep_stops_its_own_slot_and_resumes(micro_recipe_path, tmp_path):
    """With worker processes, the mua process runs the first slot in a thread: Ctrl-C (here: after the 2nd stored
    trial) stops that thread at its next step check, stores nothing half-done, and the sweep resumes."""
    import threading

    from mua_cli.sweep.sizing import Execution

    class CtrlC(Listener):
        def __init__(self):
            self.stored = 0

        def trial_done(self, spec, result):
            self.stored += 1
            if self.stored == 2:
                raise KeyboardInterrupt

    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1,A:r", lrs="2^-8:2^-5", max_extend=0, refine=0)
    run, pool = tmp_path / "run", Execution("cpu", workers_per_gpu=2, batch_trials=1)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(recipe, run, "cpu", CtrlC(), execution=pool)
    assert not [t for t in threading.enumerate() if t.name == "mua-cpu"]  # its thread (pool._Slot) has stopped
    stored = len(TrialStore.open(run).trials())
    assert 2 <= stored < 8

    class Record(Listener):  # what the CLI's progress reads: an ETA's denominator, the running trials' losses
        def __init__(self):
            self.guesses, self.losses = [], []

        def expected(self, n):
            self.guesses.append(n)

        def loss(self, spec, step, loss):
            self.losses.append((spec.key, step, loss))

    seen = Record()
    summary = run_sweep(recipe, run, "cpu", seen, execution=pool)
    assert summary.skipped == stored and summary.ran == 8 - stored
    assert seen.guesses == [8]  # refine 0: the grid, as planned
    assert seen.losses and all(math.isfinite(loss) for _, _, loss in seen.losses)
    df = load_trials(run)
    assert len(df) == 8 and df["key"].is_unique and (df["status"] == "ok").all()


def test_refinement_adds_half_octave_points_around_an_interior_optimum():
    from mua_cli.sweep.grid import refinement

    grid = {2.0**-10: [3.0], 2.0**-9: [2.5], 2.0**-8: [2.2], 2.0**-7: [2.6], 2.0**-6: [float("inf")]}
    assert sorted(refinement(grid)) == pytest.approx([2.0**-8.5, 2.0**-7.5])
    grid |= {2.0**-8.5: [2.3], 2.0**-7.5: [2.4]}
    assert refinement(grid) == []  # already there: a resumed sweep adds nothing
    edge = {2.0**-10: [2.0], 2.0**-9: [2.5], 2.0**-8: [2.6]}
    assert refinement(edge) == []  # an edge optimum is extended, not refined


def test_sweep_refines_once_the_grid_settles(micro_recipe_path, tmp_path):
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="A:r", lrs="2^-9:2^-3", max_extend=2)
    summary = run_sweep(recipe, tmp_path / "run", "cpu")
    df = load_trials(tmp_path / "run")
    lrs = sorted(df.loc[df["seed"] == 0, "lr"])
    halves = [lr for lr in lrs if abs(math.log2(lr) - round(math.log2(lr))) > 0.4]
    assert len(halves) == 2 and any("half-octave" in line for line in summary.added)
    assert set(df["seed"]) <= {0, 1}  # at most one more seed, near the optimum (see the next test)
    again = run_sweep(recipe, tmp_path / "run", "cpu")
    assert again.ran == 0


def test_failed_trials_are_retried_on_the_next_sweep_and_kept_with_no_retry(micro_recipe_path, tmp_path, monkeypatch):
    from mua_cli.sweep.sizing import Execution
    from mua_cli.train import loop as train
    from mua_cli.ui.report import sweep_table

    real = train._train
    broken = {2.0**-7}

    def flaky(spec, *args, **kwargs):
        if spec.lr in broken:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(train, "_train", flaky)
    recipe = load_recipe(
        str(micro_recipe_path), ranks="4", regimes="A:r", lrs="2^-8:2^-6", max_extend=0, refine=0, seeds=1
    )
    run, serial = tmp_path / "run", Execution("cpu", batch_trials=1)
    first = run_sweep(recipe, run, "cpu", execution=serial)
    assert first.ran == 3
    df = load_trials(run)
    assert list(df.loc[df["lr"] == 2.0**-7, "status"]) == ["failed"]
    # a failed trial is an error, not a divergence: the table says so
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(sweep_table(df))
    assert "1 │" in console.export_text()  # the failed column counts it

    kept = run_sweep(recipe, run, "cpu", execution=serial, retry_failed=False)
    assert kept.ran == 0 and kept.retried == 0
    broken.clear()  # the cause is gone (more memory, a fixed bug): the next sweep runs it again
    again = run_sweep(recipe, run, "cpu", execution=serial)
    assert again.ran == 1 and again.retried == 1 and again.skipped == 2
    df = load_trials(run)
    assert len(df) == 3 and df["key"].is_unique and (df["status"] == "ok").all()
    assert run_sweep(recipe, run, "cpu", execution=serial).ran == 0  # a finished result is final


def test_refinement_adds_a_seed_only_where_the_optimum_is_poorly_located(micro_recipe_path, tmp_path, monkeypatch):
    """A fake trainer gives A:r a sharp loss curve and B:1 a flat, noisy one: only B:1 gets another seed."""
    import numpy as np

    from mua_cli.spec.trial import TrialResult
    from mua_cli.sweep.sizing import Execution
    from mua_cli.train import loop as train

    def synthetic(spec, *args, **kwargs):
        x = math.log2(spec.lr) + 7
        curv, noise = (0.3, 0.0) if spec.regime == "A:r" else (0.004, 0.02)
        jitter = noise * np.random.default_rng(abs(hash((spec.lr, spec.seed))) % 2**32).standard_normal()
        return TrialResult("ok", 2.0 + curv * x * x * (2.0 if x > 0 else 1.0) + jitter)

    monkeypatch.setattr(train, "_train", synthetic)
    recipe = load_recipe(str(micro_recipe_path), ranks="4", regimes="A:r,B:1", lrs="2^-10:2^-4", max_extend=0)
    summary = run_sweep(recipe, tmp_path / "run", "cpu", execution=Execution("cpu", batch_trials=1))
    df = load_trials(tmp_path / "run")
    extra = df[df["seed"] == recipe.sweep.seeds]
    assert set(extra["regime"]) == {"B:1"} and len(extra) == EXTRA_LRS
    assert any("one more seed" in line for line in summary.added)
    again = run_sweep(recipe, tmp_path / "run", "cpu", execution=Execution("cpu", batch_trials=1))
    assert again.ran == 0 and again.skipped == len(df) == summary.ran  # every round's trials, not the first's
