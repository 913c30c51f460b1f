"""The GPU memory plan and what happens when a GPU runs out anyway: an out-of-memory error is never a trial's
result while smaller passes, eager steps or the GPU to itself can still run it."""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mua_cli.errors import MuaError
from mua_cli.spec.recipe import Recipe
from mua_cli.spec.trial import TrialResult, TrialSpec
from mua_cli.sweep.memory import GIB, estimate, plan
from mua_cli.sweep.trainer import GpuShare, Trainer

LM = SimpleNamespace(kind="causal-lm")


def _model(vocab: int) -> torch.nn.Module:
    """A ~135M Llama (SmolLM2's shape) on the meta device: sizes without memory."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


RECIPE = Recipe.of(model="x", batch_size=16, seq_len=256, ranks="4,16,64", regimes="B:1")
H200 = int(0.9 * 139 * GIB)


def test_a_large_vocabulary_shrinks_the_pass():
    """The case that lost a rank: vocabulary 49k, 16 × 256 tokens, rank 64, two slots on a 139 GiB GPU. Speed
    alone asked for 16 trials per pass; the plan keeps two slots' passes within the GPU."""
    mem = estimate(_model(49152), LM, RECIPE, 64)
    assert min(mem.parts["logits"], mem.parts["activations"]) > mem.parts["weights and optimizer"]
    p = plan(mem, None, H200, want_slots=2, want_k=16)
    assert p.slots == 2 and 1 < p.k < 11  # 11 trials per pass ran out of memory on that GPU
    assert p.slots * (mem.base + mem.unit(p.k)) <= H200
    assert "up to" in p.reason
    small = plan(estimate(_model(256), LM, RECIPE, 64), None, H200, 2, 16)  # a byte vocabulary: no logits cost
    assert small.k > p.k


def test_rank_and_full_finetuning_cost_more():
    m = _model(49152)
    r4, r64, full = (estimate(m, LM, RECIPE, r) for r in (4, 64, None))
    assert r4.per_trial < r64.per_trial < full.per_trial
    # a GPU that fits one full-finetuning trial but not two: one slot, whatever speed asked for
    usable = full.base + full.unit(1) + GIB
    p = plan(r64, full, usable, want_slots=2, want_k=16)
    assert p.slots == 1
    tiny = plan(r64, full, full.unit(1) // 2, 2, 16)
    assert tiny.slots == 1 and tiny.k == 1 and "trying anyway" in tiny.reason


class _OomRunner(Trainer):
    """A Trainer without a model: `fits(unit, graphs, alone)` says whether a unit would fit."""

    def __init__(self, fits, graphs=True):
        self.fits, self.graphs, self.device = fits, graphs, "cuda:0"
        self.notes, self.calls = [], []
        self.on_note = self.notes.append
        self.share, self.batchable = GpuShare(), True
        self.recipe = SimpleNamespace(optim=SimpleNamespace(batch_size=16))

    def _attempt(self, unit, graphs, alone, cb):
        self.calls.append((len(unit), graphs, alone))
        if not self.fits(unit, graphs, alone):
            return None
        return [TrialResult("ok", s.lr, device=self.device) for s in unit]

    def memory(self, rank):
        from mua_cli.sweep.memory import TrialMemory

        return TrialMemory(GIB, GIB, 30 * GIB, {"weights and optimizer": GIB, "activations": 29 * GIB})


def _specs(n):
    return [TrialSpec("B:1", 64, 2.0**-i, 0, key=str(i)) for i in range(n)]


def test_a_pass_that_does_not_fit_is_split_until_it_does(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    runner = _OomRunner(lambda unit, graphs, alone: len(unit) <= 2)
    got = runner.run_unit(_specs(8))
    assert [r.status for r in got] == ["ok"] * 8
    assert [r.metric for r in got] == [2.0**-i for i in range(8)]  # in order, each trial its own result
    assert [c[0] for c in runner.calls] == [8, 4, 2, 2, 4, 2, 2]


def test_a_pass_that_ran_out_beside_kept_units_runs_again_whole_without_them(monkeypatch):
    """Kept units (train/warm.py) hold memory a pass may need: freed, the pass runs again whole before it is
    split, so that keeping units never makes a pass smaller than it would be without them."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)

    class Keeping(_OomRunner):
        kept = 1

        def _attempt(self, unit, graphs, alone, cb):
            if self.kept:  # runs out of memory and frees the kept units, as Trainer._attempt does
                self.calls.append((len(unit), graphs, alone))
                self.kept, self.freed_kept = 0, True
                return None
            self.freed_kept = False
            return super()._attempt(unit, graphs, alone, cb)

    runner = Keeping(lambda unit, graphs, alone: len(unit) <= 8)
    got = runner.run_unit(_specs(8))
    assert [r.status for r in got] == ["ok"] * 8 and runner.calls == [(8, True, False)] * 2
    assert all(r.info.get("ran_out_beside_kept") for r in got)  # recorded: why later units are built again
    plain = _OomRunner(lambda unit, graphs, alone: len(unit) <= 4)  # nothing kept: split at once
    assert not any(r.info.get("ran_out_beside_kept") for r in plain.run_unit(_specs(8)))
    assert [c[0] for c in plain.calls] == [8, 4, 4]


def test_a_single_trial_gets_eager_steps_then_the_gpu_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    runner = _OomRunner(lambda unit, graphs, alone: alone)
    got = runner.run_unit(_specs(1))
    assert got[0].status == "ok"
    assert runner.calls == [(1, True, False), (1, False, False), (1, True, True)]
    assert "the GPU to itself" in runner.notes[-1]


def test_a_unit_that_met_another_slots_capture_runs_again_alone(monkeypatch):
    """A CUDA call that meets another slot's graph capture fails the trial through no fault of its own: the unit
    runs again with the GPU to itself, and only its second results are kept. Other failures stay as they are."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    clash = "RuntimeError: Cannot copy between CPU and CUDA tensors during CUDA graph capture unless pinned"

    class Clashing(_OomRunner):
        def _attempt(self, unit, graphs, alone, cb):
            self.calls.append((len(unit), graphs, alone))
            if alone:
                return [TrialResult("ok", s.lr, device=self.device) for s in unit]
            return [TrialResult("failed", math.nan, device=self.device, error=clash if s.key == "1" else "x")
                    for s in unit]  # fmt: skip

    runner = Clashing(lambda *a: True)
    got = runner.run_unit(_specs(3))
    assert [r.status for r in got] == ["ok"] * 3 and runner.calls == [(3, True, False), (3, True, True)]
    assert "another slot's graph capture" in runner.notes[-1]
    other = Clashing(lambda *a: True)
    got = other.run_unit([_specs(3)[0]])  # failed, but not by a clash: kept, not run again
    assert got[0].status == "failed" and other.calls == [(1, True, False)]


def test_a_cuda_error_that_breaks_the_gpu_stops_the_sweep_instead_of_failing_every_trial_after(monkeypatch):
    """After a device-side assert every later CUDA call in the process fails: the unit is not stored (it runs
    again on resume) and the sweep stops with one line that says so. A trial's other failures are results."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    assert_ = ("AcceleratorError: CUDA error: device-side assert triggered\nCUDA kernel errors might be "
               "asynchronously reported at some other API call")  # fmt: skip

    class Asserting(_OomRunner):
        error = assert_

        def _attempt(self, unit, graphs, alone, cb):
            self.calls.append((len(unit), graphs, alone))
            return [TrialResult("failed", math.nan, device=self.device, error=self.error) for s in unit]

    with pytest.raises(MuaError, match="device-side assert triggered. This process cannot use the GPU") as e:
        Asserting(lambda *a: True).run_unit(_specs(2))
    assert "run the same command again to resume" in str(e.value) and "\n" not in str(e.value)
    other = Asserting(lambda *a: True)
    other.error = "ValueError: a trial's own failure"
    assert [r.status for r in other.run_unit(_specs(2))] == ["failed", "failed"]


def test_a_trial_that_never_fits_is_failed_with_what_would(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 0)
    monkeypatch.setattr("mua_cli.sweep.memory.usable_bytes", lambda device: 16 * GIB)
    runner = _OomRunner(lambda unit, graphs, alone: False)
    got = runner.run_unit(_specs(2))
    assert [r.status for r in got] == ["failed", "failed"]
    assert "OutOfMemoryError: one trial alone does not fit on cuda:0" in got[0].error
    assert "batch_size 7" in got[0].error  # 13 GiB of room at 29/16 GiB per example
    assert runner.calls.count((1, False, True)) == 2  # each tried every way, the last eager and alone


def test_alone_waits_for_running_units_and_holds_new_ones():
    share, order = GpuShare(), []

    def unit(name, hold):
        with share.shared():
            order.append(f"{name} start")
            time.sleep(hold)
            order.append(f"{name} end")

    first = threading.Thread(target=unit, args=("a", 0.3))
    first.start()
    time.sleep(0.05)

    def alone():
        with share.alone():
            order.append("alone start")
            time.sleep(0.1)
            order.append("alone end")

    lone = threading.Thread(target=alone)
    lone.start()
    time.sleep(0.05)
    late = threading.Thread(target=unit, args=("b", 0.0))
    late.start()
    for t in (first, lone, late):
        t.join(5)
    assert order == ["a start", "a end", "alone start", "alone end", "b start", "b end"]


def test_dropout_keeps_one_slot_per_gpu(monkeypatch):
    """Dropout's random draws advance the GPU's one generator, which a capture in another thread owns: a model
    with dropout gets one slot per GPU (and still its batched passes)."""
    from mua_cli.sweep.memory import TrialMemory
    from mua_cli.sweep.sizing import Execution, planned

    monkeypatch.setattr("mua_cli.sweep.memory.usable_bytes", lambda device: 80 * GIB)
    notes = []
    small = TrialMemory(GIB // 8, GIB // 8, GIB // 8, {"activations": GIB // 8})
    runner = SimpleNamespace(n_params=5e6, device="cuda:0", on_note=notes.append, has_dropout=True,
                             memory=lambda rank: small)  # fmt: skip
    assert planned(Execution("cuda:0"), RECIPE, runner) == (1, 16)
    assert "dropout" in notes[0]
    runner.has_dropout = False
    assert planned(Execution("cuda:0"), RECIPE, runner) == (2, 16)
    runner.has_dropout = True
    assert planned(Execution("cuda:0", workers_per_gpu=2), RECIPE, runner) == (2, 16)  # the user's word stands
