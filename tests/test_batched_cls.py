"""Batched trials for classifiers: K LoRA trials of a sequence or image classifier, each with its own copy of
the head (trained in full at the fixed head LR), must give what the serial path gives trial by trial."""

from __future__ import annotations

import math

import pytest
import tiny_hf as T
import torch

from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import make_spec
from mua_cli.sweep.trainer import Trainer
from mua_cli.train.batched import run_batched
from mua_cli.train.loop import run_trial
from mua_cli.train.stacked import NotBatchable

KINDS = {
    "bert": (T.bert, lambda p: T.cls_csv(p / "d.csv"), {"task": "seq-cls", "label_field": "sentiment"}),
    "roberta": (T.roberta, lambda p: T.cls_csv(p / "d.csv"), {"task": "seq-cls", "label_field": "sentiment"}),
    "vit": (T.vit, lambda p: T.image_folder(p / "img"), {"task": "image-cls"}),
}


def _runner(kind: str, folder) -> tuple[Trainer, object]:
    build_model, build_data, fields = KINDS[kind]
    model, data = build_model(folder / "model"), build_data(folder)
    recipe = load_recipe(str(T.recipe_yaml(folder / "r.yaml", model=str(model), data=str(data), **fields)))
    recipe = recipe.replace(steps=12, divergence_factor=1.5, eval_fraction=0.25)
    runner = Trainer.load(recipe, "cpu")
    for m in runner.base.modules():  # dropout draws differ between one trial and K: compare without it
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return runner, recipe


@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_classifier_trials_match_serial(kind, tmp_path):
    runner, recipe = _runner(kind, tmp_path)
    runner.data.fixed_shape = True  # as on a GPU: one padded width for every batch
    lrs = [2.0**-8, 2.0**-5, 2.0**12]  # the last diverges
    specs = [make_spec(recipe, "B:1", 2, lr, 0) for lr in lrs]
    serial = [run_trial(s, runner.base, runner.data, recipe, "cpu") for s in specs]
    batched = run_batched(specs, runner.base, runner.data, recipe, "cpu")
    assert [r.status for r in batched] == [r.status for r in serial]
    assert serial[0].status == "ok" and serial[-1].status == "diverged"
    for a, b in zip(serial, batched, strict=True):
        if a.status == "ok":  # an exploding trial's curve is chaotic: where it crosses the bar may differ by a step
            assert b.loss_curve == pytest.approx(a.loss_curve, rel=1e-4, abs=1e-4)
            assert b.eval_loss == pytest.approx(a.eval_loss, rel=1e-4)
            assert b.info["eval_accuracy"] == a.info["eval_accuracy"]
            assert b.info["batched_with"] == 3
        else:
            assert math.isinf(b.metric)
    # the head trained: a trial's loss curve would be flat at a zero LR without it, and its LR is the head's
    assert serial[0].loss_curve[-1] != serial[0].loss_curve[0]


def test_padded_per_batch_runs_one_by_one(tmp_path):
    """Batches that change shape (the CPU's per-batch padding) cannot be batched: the runner says so once and
    runs the unit's trials one by one, with the serial path's results."""
    runner, recipe = _runner("bert", tmp_path)
    notes = []
    runner.on_note = notes.append
    assert not runner.data.fixed_shape
    specs = [make_spec(recipe, "A:r", 2, lr, 0) for lr in (2.0**-7, 2.0**-5)]
    with pytest.raises(NotBatchable):
        run_batched(specs, runner.base, runner.data, recipe, "cpu")
    got = runner.run_unit(specs)
    assert [r.metric for r in got] == pytest.approx([runner.run(s).metric for s in specs], rel=1e-6)
    assert not runner.batchable and sum("one by one" in n for n in notes) == 1


def test_a_lone_trial_the_batched_path_turns_away_runs_on_its_own(tmp_path):
    """Where units are kept, a lone trial tries the batched path (sweep/trainer.py); batches that change shape
    turn it away, and it runs on its own at once, with the serial path's result, said once."""
    from mua_cli.train.warm import WarmUnits

    runner, recipe = _runner("bert", tmp_path)
    notes = []
    runner.on_note, runner.warm = notes.append, WarmUnits(2**40)
    spec = make_spec(recipe, "A:r", 2, 2.0**-6, 0)
    got = runner.run_unit([spec])[0]
    assert got.status == "ok" and "batched_with" not in got.info
    assert got.metric == pytest.approx(runner.run(spec).metric, rel=1e-6)
    assert not runner.batchable and sum("one by one" in n for n in notes) == 1 and len(runner.warm) == 0
