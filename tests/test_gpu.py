"""On a CUDA GPU only (skipped elsewhere; run on the lent H200, see docs/performance.md): a step replayed as a
CUDA graph gives the eager step's trials, and a step that cannot be captured runs eagerly instead."""

from __future__ import annotations

import gc
import threading
from types import SimpleNamespace

import pytest
import torch

from mua_cli.accel.graphed import Step, empty_cache
from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import make_spec
from mua_cli.sweep.trainer import Trainer
from mua_cli.train.batched import run_batched
from mua_cli.train.loop import run_trial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    import yaml
    from conftest import TINY_TEST_RECIPE

    p = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    p.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    return load_recipe(str(p)).replace(steps=40)


@pytest.fixture(scope="module")
def runner(micro):
    r = Trainer.load(micro, "cuda:0")
    yield r
    r.close()  # Liger's process-wide patches would otherwise reach the CPU tests that follow


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
    assert len(graphed.loss_curve) == micro.optim.steps


def test_graphed_batch_matches_eager_with_a_diverging_trial(micro, runner):
    # Factor 1.2: the two sound trials stay below 1.06x their first loss, and the LR-128 trial passes 1.29x at its
    # 2nd step, during the eager warm-up of both paths. A factor of 1.05 made a sound trial hover at the threshold
    # (stopped at step 14 eagerly, 39 graphed); the default 2.0 left the LR-128 trial to chance: its activations
    # overflow, and the final norm bounds its loss, so it ended "ok" eagerly and in NaN graphed. The replayed
    # steps then run with a stopped trial in the batch, which must not disturb the others.
    micro = micro.replace(divergence_factor=1.2)
    specs = [make_spec(micro, "B:1", 4, lr, 0) for lr in (2.0**-9, 2.0**-6, 2.0**7)]
    eager = run_batched(specs, runner.base, runner.data, micro, "cuda:0", graphs=False)
    notes: list[str] = []
    graphed = run_batched(specs, runner.base, runner.data, micro, "cuda:0", graphs=True, on_note=notes.append)
    assert notes == []
    assert graphed[-1].status == "diverged"
    assert [len(r.loss_curve) for r in graphed[:2]] == [micro.optim.steps] * 2
    for a, b in zip(eager, graphed, strict=True):
        _same(a, b)


def test_a_kept_graphed_unit_replays_what_a_new_one_trains(micro, runner):
    """A unit kept after its capture (train/warm.py) replays its graph from the first step of the next unit,
    with another seed and other LRs, one of which diverges: what a newly built graphed unit trains."""
    from mua_cli.train.warm import WarmUnits

    micro = micro.replace(divergence_factor=1.2)
    warm = WarmUnits(2**40)
    first = [make_spec(micro, "B:1", 4, lr, 0) for lr in (2.0**-8, 2.0**-6, 2.0**-5)]
    run_batched(first, runner.base, runner.data, micro, "cuda:0", graphs=True, warm=warm)
    then = [make_spec(micro, "B:1", 4, lr, 1) for lr in (2.0**-9, 2.0**-6, 2.0**7)]
    kept = run_batched(then, runner.base, runner.data, micro, "cuda:0", graphs=True, warm=warm)
    fresh = run_batched(then, runner.base, runner.data, micro, "cuda:0", graphs=True)
    warm.clear()
    assert all(r.info.get("warm_unit") for r in kept) and warm.taken == 1
    assert kept[-1].status == "diverged" and fresh[-1].status == "diverged"
    for a, b in zip(fresh[:2], kept[:2], strict=True):
        _same(a, b)


def test_a_lone_trial_as_a_kept_unit_of_one_trains_what_it_trains_alone(micro, runner):
    """Where a GPU keeps built units, a one-trial unit runs batched (sweep/trainer.py): built and captured once,
    then reset and replayed for the next lone trial, another seed and LR; each trains what it trains alone."""
    from mua_cli.train.warm import WarmUnits

    specs = [make_spec(micro, "B:1", 4, lr, seed) for lr, seed in ((2.0**-7, 0), (2.0**-6, 1))]
    alone = [run_trial(s, runner.base, runner.data, micro, "cuda:0", graphs=True) for s in specs]
    warm, runner.warm = runner.warm, WarmUnits(2**40)
    try:
        ran = [runner.run_unit([s])[0] for s in specs]
        assert runner.warm.taken == 1 and [r.info.get("batched_with") for r in ran] == [1, 1]
    finally:
        runner.warm.clear()
        runner.warm = warm
    for a, b in zip(alone, ran, strict=True):
        assert a.status == "ok", a.error
        _same(a, b)


def test_graphed_sweep_of_the_embedded_default_matches_eager():
    """The embedded default's B:1 r=4 grid, whose high LRs go unstable mid-run: with cuDNN attention inside the
    graph, trials that eager steps finish ended in NaN (graphed.py); every status and optimum must agree."""
    tiny = load_recipe("tiny")
    runner = Trainer.load(tiny, "cuda:0")
    specs = [make_spec(tiny, "B:1", 4, 2.0**e, 0) for e in range(-11, -3)]
    try:
        eager = run_batched(specs, runner.base, runner.data, tiny, "cuda:0", graphs=False)
        graphed = run_batched(specs, runner.base, runner.data, tiny, "cuda:0", graphs=True)
    finally:
        runner.close()
    assert [r.status for r in graphed] == [r.status for r in eager]
    best = min(range(len(specs)), key=lambda i: eager[i].metric)
    assert min(range(len(specs)), key=lambda i: graphed[i].metric) == best
    for a, b in zip(eager[: best + 2], graphed[: best + 2], strict=True):  # up to one grid step past the optimum
        assert b.metric == pytest.approx(a.metric, rel=1e-2)


def _fused_and_own(micro, specs) -> tuple[list, list]:
    """The trials run with Liger's kernels and with the model's own, after checking that fusing took."""
    from transformers.models.llama import modeling_llama

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm.forward
    notes: list[str] = []
    fused = Trainer.load(micro, "cuda:0", notes.append)
    own = Trainer.load(micro, "cuda:0", fused=False)  # built after: the process-wide patches must not reach it
    assert any("fused kernels" in n for n in notes), notes
    assert modeling_llama.apply_rotary_pos_emb is not rope
    assert fused.base.model.norm.forward.__func__ is not norm and own.base.model.norm.forward.__func__ is norm
    results = {}
    try:
        for name, r in (("own", own), ("fused", fused)):
            results[name] = [run_batched(s, r.base, r.data, micro, "cuda:0") if isinstance(s, list)
                             else [run_trial(s, r.base, r.data, micro, "cuda:0")] for s in specs]  # fmt: skip
    finally:
        fused.close()
    assert modeling_llama.apply_rotary_pos_emb is rope
    return sum(results["own"], []), sum(results["fused"], [])


def test_fused_kernels_keep_the_trials(micro):
    """Liger's RMSNorm, rotary embedding and SwiGLU (fused.py) against the model's own kernels: the same
    trials, to bf16 rounding; and closing the runner puts the modeling module back."""
    pytest.importorskip("liger_kernel")
    serial = make_spec(micro, "A:r", 8, 2.0**-7, 0)
    batch = [make_spec(micro, "B:1", 4, lr, 0) for lr in (2.0**-9, 2.0**-6)]
    for a, b in zip(*_fused_and_own(micro, [serial, batch]), strict=True):
        assert a.status == b.status == "ok"
        assert b.loss_curve == pytest.approx(a.loss_curve, rel=5e-3)
        assert b.metric == pytest.approx(a.metric, rel=2e-3)


def test_fused_kernels_keep_full_finetuning(micro):
    """Full finetuning trains the norms' weights too: through Liger's backward."""
    pytest.importorskip("liger_kernel")
    (a,), (b,) = _fused_and_own(micro, [make_spec(micro, "full", 0, 2.0**-10, 0)])
    assert a.status == b.status == "ok"
    assert b.loss_curve == pytest.approx(a.loss_curve, rel=5e-3)
    assert b.metric == pytest.approx(a.metric, rel=2e-3)


def test_frozen_norms_run_torchs_rms_norm(monkeypatch):
    """A frozen RMSNorm (LoRA) runs torch's fused kernel, which skips the weight's gradient; a trained one
    (full finetuning) keeps Liger's. Both give the same output and input gradient, to bf16 rounding."""
    pytest.importorskip("liger_kernel")
    from test_lora_addmm import llama

    from mua_cli.accel.fused import fuse

    model = llama(torch.bfloat16).cuda()
    undo = fuse(model, "cuda")
    calls: list[int] = []
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(1) or rms_norm(*a, **k))
    try:
        norm = model.model.norm
        norm.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(64, norm.weight.shape[0], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = {}
        for trained in (False, True):
            norm.weight.requires_grad_(trained)
            x.grad = None
            y = norm(x)
            y.backward(torch.ones_like(y).uniform_(-1, 1, generator=torch.Generator("cuda").manual_seed(0)))
            out[trained] = (y.float(), x.grad.float())
            assert len(calls) == 1  # the frozen pass only
    finally:
        undo()
    for a, b in zip(out[False], out[True], strict=True):
        assert (a - b).norm() <= 1e-2 * b.norm()


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


def test_a_failed_capture_leaves_no_memory_behind():
    """A capture that fails gives back what it allocated (accel/graphed.py's release_failed_pools where torch
    does not): else every later unit on the GPU runs short, and a capped sweep fails trials that fit."""
    gc.collect()
    empty_cache()
    before = torch.cuda.memory_reserved(0)

    def fn():
        x = torch.ones(2**28, device="cuda:0")  # 1 GiB: in the graph's pool while capturing
        x.sum().item()  # a host sync: not capturable

    step = Step(fn, "cuda:0", True, None)
    for _ in range(5):
        step([])
    assert not step.graphed  # the capture failed and the step ran eagerly
    del step
    gc.collect()
    torch.cuda.empty_cache()
    print(f"torch's own empty_cache left {(torch.cuda.memory_reserved(0) - before) / 2**30:.2f} GiB")  # -rP
    empty_cache()
    assert torch.cuda.memory_reserved(0) - before < 2**28


def test_a_capture_never_records_another_threads_replays():
    """accel/graphed.side_stream: one thread replays its captured step on its own stream while another warms
    up and captures forty steps. Were each capture on a stream made for it, one of them (torch hands out 32
    streams a priority, round robin) would be the first thread's, and its replay launched there would meet the
    capture: it raises, or is recorded into the capture instead of running, and the counts differ."""
    x = torch.zeros((), device="cuda:0")
    own = torch.cuda.Stream("cuda:0")  # as a slot's stream (sweep/pool.py)
    stop, steps, errors = threading.Event(), [0], []

    def slot() -> None:
        try:
            with torch.cuda.stream(own):
                step = Step(lambda: x.add_(1), "cuda:0", True, None)
                while not stop.is_set() or steps[0] < 200:
                    step([])
                    steps[0] += 1
                own.synchronize()
        except BaseException as e:  # noqa: BLE001 — asserted below, in the test's thread
            errors.append(e)

    thread = threading.Thread(target=slot)
    thread.start()
    try:
        for _ in range(40):
            torch.cuda.Stream("cuda:0")  # as other code may draw: so that no fixed phase of the 32 is skipped
            y = torch.zeros((), device="cuda:0")
            step = Step(lambda y=y: y.add_(1), "cuda:0", True, None)
            for _ in range(6):
                step([])
            assert step.graph is not None
            assert float(y) == 6  # three warm-up steps, then the capture's replay and two more
            step.close()
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert float(x) == steps[0]


def test_captured_step_attends_without_a_mask_tensor(micro, runner, monkeypatch):
    # transformers builds an explicit causal mask while a stream captures, and SDPA then cannot use flash
    # attention (attention.py); mua's trial models attend with is_causal and no mask, captured or not.
    calls: list[tuple[bool, bool, bool]] = []
    cudnn: list[bool] = []  # cuDNN's kernel is allowed (and first) for mask-free attention only
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((torch.cuda.is_current_stream_capturing(), attn_mask is None, bool(is_causal)))
        cudnn.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    spec = make_spec(micro, "B:1", 2, 2.0**-7, 0)
    notes: list[str] = []
    result = run_trial(spec, runner.base, runner.data, micro, "cuda:0", graphs=True, on_note=notes.append)
    assert result.status == "ok" and notes == []
    captured = [c for c in calls if c[0]]
    assert captured and all(c == (True, True, True) for c in captured) and all(cudnn)
    assert runner.base.config._attn_implementation == "sdpa"  # the trial's copy was switched, not the base


def test_captured_image_classifier_attends_without_a_mask_tensor(tmp_path, monkeypatch):
    # Images are never padded, but transformers builds an all-ones mask while a stream captures; with it SDPA
    # fell back to its math kernel, in fp32 (docs/performance.md). Batched trials, as a sweep runs them.
    import tiny_hf as T

    recipe = load_recipe(str(T.recipe_yaml(tmp_path / "r.yaml", model=str(T.vit(tmp_path / "model")),
                                           data=str(T.image_folder(tmp_path / "img")), task="image-cls",
                                           dtype="bfloat16")))  # fmt: skip
    recipe = recipe.replace(steps=8, eval_fraction=0.25)
    runner = Trainer.load(recipe, "cuda:0")
    calls: list[tuple[bool, bool, bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        capturing = torch.cuda.is_current_stream_capturing()
        calls.append((capturing, attn_mask is None, bool(is_causal), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    specs = [make_spec(recipe, "B:1", 2, lr, 0) for lr in (2.0**-8, 2.0**-6)]
    notes: list[str] = []
    results = run_batched(specs, runner.base, runner.data, recipe, "cuda:0", graphs=True, on_note=notes.append)
    runner.close()
    assert [r.status for r in results] == ["ok", "ok"] and notes == []
    captured = [c for c in calls if c[0]]
    assert captured and all(c == (True, True, False, True) for c in captured)


@pytest.mark.parametrize("k", [1, 3])
def test_whole_layer_lora_matches_peft_on_the_gpu(k, monkeypatch):
    """mua's GPU LoRA layer (lora_gpu.py: bf16 base, autocast) against peft's own forward."""
    from test_lora_addmm import CFG, assert_folded_matches_peft, llama, perturbed

    from mua_cli.spec.recipe import Recipe
    from mua_cli.train.adapters import prepare
    from mua_cli.train.stacked import build

    base = llama(torch.bfloat16)
    if k == 1:
        model = prepare(base, "A:r", 4, 1.0, "all-linear", seed=3)
    else:
        recipe = Recipe.of(name="t", model="embedded:tiny", ranks="4", regimes="A:r", targets="all-linear")
        model, _, _ = build(base, make_spec(recipe, "A:r", 4, 0.01, 0), recipe, k)
    x = torch.randint(0, CFG.vocab_size, (2 * k, 9), device="cuda")
    assert_folded_matches_peft(perturbed(model).cuda(), x, True, True, monkeypatch)


@pytest.mark.parametrize("per_gpu", [1, 2])
def test_thread_slots_give_the_main_threads_trials(micro, runner, per_gpu):
    """The pool's slots are threads of this process (pool.py): one on the GPU's default stream, as on a
    machine of several GPUs, or two sharing this GPU, each on its own stream, one capturing while the other
    replays. Every trial is the one the main thread runs, and every step was captured."""
    from mua_cli.sweep.grid import plan
    from mua_cli.sweep.pool import Pool
    from mua_cli.sweep.sizing import Execution

    specs = plan(micro)  # 2 regimes × 2 ranks × 5 LRs, one trial per unit: the same units both ways
    ref = {s.key: run_trial(s, runner.base, runner.data, micro, "cuda:0") for s in specs}
    notes: list[str] = []
    listener = SimpleNamespace(note=notes.append, loss=lambda spec, step, loss: None)
    first = Trainer.load(micro, "cuda:0", notes.append)
    pool = Pool.start(micro, Execution("cuda:0", per_gpu, 1), listener, ["cuda:0"], first)
    try:
        assert len(pool.slots) == per_gpu and pool.procs == []
        pool.submit(specs)
        got = {spec.key: result for spec, result in (pool.next() for _ in specs)}
    finally:
        pool.close()
    assert sorted(got) == sorted(ref)
    for key, result in got.items():
        _same(ref[key], result)
    assert not [n for n in notes if "capture failed" in n], notes
