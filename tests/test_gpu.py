"""On a CUDA GPU only (skipped elsewhere; run on the lent H200, see docs/performance.md): a step replayed as a
CUDA graph gives the eager step's trials, and a step that cannot be captured runs eagerly instead."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mua_cli.batched import run_batched
from mua_cli.graphed import Step
from mua_cli.recipe import load_recipe
from mua_cli.runner import TrialRunner
from mua_cli.sweep import make_spec
from mua_cli.train import run_trial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    import yaml
    from conftest import TINY_TEST_RECIPE

    p = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    p.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    return dataclasses.replace(load_recipe(str(p)), steps=40)


@pytest.fixture(scope="module")
def runner(micro):
    return TrialRunner(micro, "cuda:0")


def _same(a, b):
    assert a.status == b.status
    assert len(a.loss_curve) == len(b.loss_curve) > 0
    assert b.loss_curve == pytest.approx(a.loss_curve, rel=2e-3, abs=2e-3)
    if a.status == "ok":
        assert b.metric == pytest.approx(a.metric, rel=2e-3)


@pytest.mark.parametrize("regime,rank", [("A:r", 8), ("B:1", 2), ("full", 0)])
def test_graphed_trial_matches_eager(micro, runner, regime, rank):
    spec = make_spec(micro, regime, rank, 2.0**-7 if regime != "full" else 2.0**-10, 0)
    notes: list[str] = []
    eager = run_trial(spec, runner.base, runner.data, micro, "cuda:0", graphs=False)
    graphed = run_trial(spec, runner.base, runner.data, micro, "cuda:0", graphs=True, on_note=notes.append)
    assert notes == []  # captured, not fallen back
    assert eager.status == "ok", eager.error
    _same(eager, graphed)
    assert len(graphed.loss_curve) == micro.steps


def test_graphed_batch_matches_eager_with_a_diverging_trial(micro, runner):
    # The default divergence factor: with 1.05, a trial hovering at the threshold stopped at step 14 eagerly and at
    # step 39 graphed (cuBLAS may pick other kernels while capturing: losses differ by ~1e-5 from the first replay).
    specs = [make_spec(micro, "B:1", 4, lr, 0) for lr in (2.0**-9, 2.0**-6, 2.0**7)]  # the last blows up at once
    eager = run_batched(specs, runner.base, runner.data, micro, "cuda:0", graphs=False)
    notes: list[str] = []
    graphed = run_batched(specs, runner.base, runner.data, micro, "cuda:0", graphs=True, on_note=notes.append)
    assert notes == []
    assert graphed[-1].status == "diverged"
    for a, b in zip(eager, graphed, strict=True):
        _same(a, b)


def test_graphed_sweep_of_the_embedded_default_matches_eager():
    """The embedded default's B:1 r=4 grid, whose high LRs go unstable mid-run: with cuDNN attention inside the
    graph, trials that eager steps finish ended in NaN (graphed.py); every status and optimum must agree."""
    tiny = load_recipe("tiny")
    runner = TrialRunner(tiny, "cuda:0")
    specs = [make_spec(tiny, "B:1", 4, 2.0**e, 0) for e in range(-11, -3)]
    eager = run_batched(specs, runner.base, runner.data, tiny, "cuda:0", graphs=False)
    graphed = run_batched(specs, runner.base, runner.data, tiny, "cuda:0", graphs=True)
    assert [r.status for r in graphed] == [r.status for r in eager]
    best = min(range(len(specs)), key=lambda i: eager[i].metric)
    assert min(range(len(specs)), key=lambda i: graphed[i].metric) == best
    for a, b in zip(eager[: best + 2], graphed[: best + 2], strict=True):  # up to one grid step past the optimum
        assert b.metric == pytest.approx(a.metric, rel=1e-2)


def test_a_step_that_cannot_be_captured_runs_eagerly():
    x = torch.zeros((), device="cuda:0")
    seen: list[float] = []

    def fn():
        x.add_(1)
        seen.append(x.item())  # a host sync: not capturable

    notes: list[str] = []
    step = Step(fn, "cuda:0", True, notes.append)
    for _ in range(6):
        step([])
    step.close()
    assert float(x) == 6 and seen == [1, 2, 3, 4, 5, 6]
    assert len(notes) == 1 and "runs eagerly" in notes[0]
