"""fused.py without a GPU: what it does when it cannot fuse, and that it undoes Liger's process-wide patches
while keeping the model's own (a stand-in for liger-kernel plays Liger's part; the real kernels are checked
against the model's own in tests/test_gpu.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from mua_cli.accel.fused import fuse


@pytest.fixture
def llama():
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel.transformers.monkey_patch with a Llama patcher that does what Liger's does, in kind."""
    calls: list[dict] = []

    def apply_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                       model=None):  # Liger's signature and defaults  # fmt: skip
        calls.append(dict(rope=rope, rms_norm=rms_norm, swiglu=swiglu, model=model, cross_entropy=cross_entropy,
                          fused_linear_cross_entropy=fused_linear_cross_entropy))  # fmt: skip
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: "fused rope"
        modeling_llama.LlamaRMSNorm = type("FusedNorm", (torch.nn.Module,), {})
        modeling_llama.brand_new_name = 1
        model.model.norm.forward = lambda x: x  # an instance patch: Liger binds its forward to the module

    mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_to_llama}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mod)
    return calls


def test_cpu_is_left_alone(llama, fake_liger):
    notes: list[str] = []
    fuse(llama, "cpu", notes.append)()
    assert fake_liger == [] and notes == []


def test_without_liger_a_gpu_run_says_how_to_get_it(llama, monkeypatch):
    for name in ["liger_kernel", *(m for m in sys.modules if m.startswith("liger_kernel."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, even after a GPU test imported it
    notes: list[str] = []
    fuse(llama, "cuda:0", notes.append)()
    assert len(notes) == 1 and "pip install liger-kernel" in notes[0]


def test_an_unknown_model_type_runs_its_own_kernels(fake_liger):
    model = torch.nn.Linear(2, 2)
    notes: list[str] = []
    fuse(model, "cuda", notes.append)()
    assert fake_liger == [] and "no fused kernels for model type None" in notes[0]


def test_the_process_wide_patches_are_undone_and_the_models_kept(llama, fake_liger):
    rope, norm_cls = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    notes: list[str] = []
    undo = fuse(llama, "cuda:0", notes.append)
    (call,) = fake_liger
    assert call["model"] is llama and call["rope"] and call["rms_norm"] and call["swiglu"]
    assert not call["cross_entropy"] and not call["fused_linear_cross_entropy"]  # the loss stays mua's
    assert "fused kernels" in notes[0]
    assert modeling_llama.LlamaRMSNorm is norm_cls  # at once: models built later keep their own modules
    q = torch.ones(1, 2, 3, 4)  # on the CPU: the model's own rotary embedding, not Liger's
    assert torch.is_tensor(modeling_llama.apply_rotary_pos_emb(q, q, torch.ones(1, 3, 4), torch.zeros(1, 3, 4))[0])
    undo()
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm_cls
    assert not hasattr(modeling_llama, "brand_new_name")
    x = torch.ones(3)
    assert llama.model.norm(x) is x  # the instance keeps its patch


def test_a_liger_that_fails_leaves_the_model_its_own_kernels(llama, fake_liger, monkeypatch):
    """Liger patching a transformers it does not fit: one note, the module back as it was, no error."""
    mod = sys.modules["liger_kernel.transformers.monkey_patch"]

    def half_then_fail(model=None, **kw):
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: "half-patched"
        raise AttributeError("module has no attribute 'LlamaMLP'")

    monkeypatch.setitem(mod.MODEL_TYPE_TO_APPLY_LIGER_FN, "llama", half_then_fail)
    rope = modeling_llama.apply_rotary_pos_emb
    notes: list[str] = []
    undo = fuse(llama, "cuda:0", notes.append)
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert len(notes) == 1 and "could not be applied (AttributeError" in notes[0]
    undo()
    assert modeling_llama.apply_rotary_pos_emb is rope


def test_liger_optional_backend_warnings_are_dropped(llama, fake_liger, caplog):
    """Liger's lines about backends it cannot import (CuTe DSL, Ascend) stay out of a sweep's output; its
    other warnings do not."""
    import logging

    logger = logging.getLogger("liger_kernel.backends.registry")
    fuse(llama, "cuda:0")()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Backend impl '%s' for op '%s' could not be imported: %s", "x._cutedsl.rope", "rope", "E")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_a_copied_norm_runs_on_its_own_weights():
    """Trials train deep copies of the fused base: a copy's norm (here on the CPU, so Liger's path) must use
    the copy's weights, not the base's (a full-finetuning trial trains them)."""
    import copy
    import types

    from mua_cli.accel.fused import frozen_norms

    norm = torch.nn.Module()
    norm.weight, norm.offset = torch.nn.Parameter(torch.ones(3)), 0
    norm.forward = types.MethodType(lambda self, x: x * self.weight, norm)  # as Liger binds its forward
    norm._get_name = lambda: "LigerRMSNorm"
    frozen_norms(norm)
    trial = copy.deepcopy(norm)
    with torch.no_grad():
        trial.weight.fill_(2.0)
    assert torch.equal(trial(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(norm(torch.ones(3)), torch.ones(3))
