"""`mua sweep --full-check`: full finetuning alone at a quarter of the steps, in RUN/full-check, shown beside the
full-finetuning prediction and never in its place (docs/validation.md, the fourth run)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY_TEST_RECIPE
from synthetic import LOG2C, trials
from typer.testing import CliRunner

from mua_cli import api
from mua_cli.errors import MuaError
from mua_cli.science.fit import fit_run
from mua_cli.science.full_ft import predict_full
from mua_cli.spec.recipe import Recipe
from mua_cli.ui.cli import app


def test_the_check_is_full_finetuning_alone_at_a_quarter_of_the_steps():
    r = Recipe.of(steps=100, ranks="4,16,64", regimes="A:r,B:1", lrs="2^-10:2^-4", seeds=2, batch_size=4)
    c = r.full_check()
    assert c.rank_list == ["full"] and not c.lora_ranks and c.optim.steps == 25
    assert (c.sweep.lrs, c.sweep.seeds, c.optim.batch_size, c.data.source) == ("2^-10:2^-4", 2, 4, r.data.source)
    assert Recipe.of(steps=5).full_check().optim.steps == 2  # never below a schedule's two steps


def _target():
    return fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), seeds=(0, 1), noise=0.005))


def _check_at(log2_lr: float):
    return fit_run(trials({}, seeds=(0,), noise=0.005, full_log2=log2_lr, grid=range(-16, -2)))


def test_a_check_inside_the_interval_is_evidence_and_the_answer_stays_the_prediction():
    target = _target()
    plain = predict_full(target)
    p = predict_full(target, check=_check_at(math.log2(plain.lr) + 0.1))
    assert (p.lr, p.lo, p.hi, p.basis) == (plain.lr, plain.lo, plain.hi, plain.basis)
    ev = p.evidence["full_check"]
    assert ev["inside"] is True and math.log2(ev["lr"]) == pytest.approx(math.log2(plain.lr) + 0.1, abs=0.15)
    assert "lies inside the interval" in p.reason and not any("disagree" in n for n in p.notes)


def test_a_check_outside_the_interval_warns_that_the_two_disagree():
    target = _target()
    plain = predict_full(target)
    p = predict_full(target, check=_check_at(math.log2(plain.lo) - 2))
    assert p.lr == plain.lr and p.evidence["full_check"]["inside"] is False
    assert "lies outside the interval" in p.reason
    assert any("disagree" in n and "--ranks ...,full" in n for n in p.notes)


def test_measured_full_finetuning_beats_the_check_and_a_check_without_an_optimum_says_why():
    measured = fit_run(trials({"B:1": -0.3}, ranks=(4, 16, 64), seeds=(0, 1), noise=0.005, full_log2=LOG2C - 1.5))
    p = predict_full(measured, check=_check_at(LOG2C - 4))
    assert p.basis == "measured" and "full_check" not in p.evidence
    edge = fit_run(trials({}, seeds=(0,), noise=0.005, full_log2=-20.0, grid=range(-12, -2)))  # optimum off the grid
    q = predict_full(_target(), check=edge)
    assert "full_check" not in q.evidence and any("has no usable optimum" in n for n in q.notes)


def test_sweep_offers_the_check_then_runs_it_and_transfer_shows_it(tmp_path):
    recipe = Recipe.of(**{**TINY_TEST_RECIPE, "ranks": "4,16", "regimes": "B:1"})
    run = tmp_path / "run"
    summary = api.run_sweep(recipe, run, "cpu")
    assert "--full-check" in summary.full_check_offer and summary.check is None
    again = api.run_sweep(recipe, run, "cpu", full_check=True)
    assert again.ran == 0 and again.full_check_offer == ""  # the LoRA sweep resumed: nothing to run again
    assert again.check is not None and again.check.ran > 0
    stored = api.load_trials(run / api.FULL_CHECK)
    assert set(stored["regime"]) == {"full"} and set(stored["steps"]) == {recipe.full_check().optim.steps}
    assert len(api.load_trials(run)) == summary.ran  # the check's trials live in their own folder
    check = api.full_check_fit(run)
    assert check is not None and api.full_check_fit(tmp_path / "elsewhere") is None
    assert check.full is not None and check.full.usable
    pred = api.predict(api.fit(run), "full-ft", check=check)
    shown = pred.evidence["full_check"]
    assert shown["lr"] == check.full.lr_star and shown["steps"] == recipe.full_check().optim.steps
    assert shown["inside"] == (pred.lo <= shown["lr"] <= pred.hi)
    out = CliRunner().invoke(app, ["transfer", str(run), "--to", "full-ft", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["evidence"]["full_check"] == shown  # the command finds it
    (run / api.FULL_CHECK / "trials.db").write_bytes(b"not a database")  # a rank target never reads the check
    assert CliRunner().invoke(app, ["transfer", str(run), "--to", "16", "--quiet"]).exit_code == 0
    assert CliRunner().invoke(app, ["transfer", str(run), "--to", "full-ft", "--quiet"]).exit_code == 2


def test_the_check_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(MuaError, match="measures it"):
        api.run_sweep(Recipe.of(ranks="4,full"), tmp_path / "a", "cpu", full_check=True)
    with pytest.raises(MuaError, match="local run folder"):
        api.run_sweep(Recipe.of(), tmp_path / "b", "cpu", storage=f"sqlite:///{tmp_path}/s.db", full_check=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_dry_run_shows_the_checks_plan_and_writes_nothing(tmp_path, micro_recipe_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["sweep", "--recipe", str(micro_recipe_path), "--out", str(out), "--device", "cpu",
                                   "--dry-run", "--full-check"])  # fmt: skip
    steps = Recipe.of(**TINY_TEST_RECIPE).full_check().optim.steps
    assert res.exit_code == 0 and f"full finetuning, {steps} steps each, into {out / api.FULL_CHECK}" in res.stdout
    assert not out.exists()
