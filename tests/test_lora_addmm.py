"""LoRA's scale-and-add folded into its second matmul (lora_addmm.py) gives peft's outputs and gradients, for
serial and batched adapters, in fp32 and under bf16 autocast; layers it cannot fold run peft's forward."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

from mua_cli.accel.lora_addmm import fold_lora_adds
from mua_cli.accel.lora_gpu import GroupedLora, LoraLinearFn, precast_adapters, state_of
from mua_cli.spec.recipe import Recipe
from mua_cli.sweep.grid import make_spec
from mua_cli.train.adapters import prepare
from mua_cli.train.stacked import build

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)


def llama(dtype=torch.float32, cfg=CFG):
    """Under autocast the tests use a bf16 base, as mua does on a GPU."""
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def perturbed(model):
    """Every adapter weight random (B is zero at init: its branch would count for nothing)."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    return model


def loss_and_grads(model, x, autocast: bool):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, use_cache=False).logits.float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def close(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> bool:
    """fp32: elementwise; bf16: within 5 % of the tensor's norm (bf16 keeps 8 bits: the two paths round at
    different places, 2.5 % apart at most in the first layer's gradients)."""
    if bf16:
        return bool((a.float() - b.float()).norm() <= 5e-2 * a.float().norm())
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def peft_forbidden(monkeypatch):
    """From here on, peft's own LoRA forward raises: what follows must take the folded path."""

    def forbidden(*a, **k):
        raise AssertionError("peft's forward ran")

    monkeypatch.setattr(LoraLinear, "forward", forbidden)


def whole_layer_spy(monkeypatch) -> Counter:
    """Counts calls of the one-function layers (LoraLinearFn, GroupedLora), to show which path ran."""
    calls: Counter = Counter()
    for fn in (LoraLinearFn, GroupedLora):
        monkeypatch.setattr(fn, "apply", lambda *a, fn=fn, apply=fn.apply: calls.update([fn.__name__]) or apply(*a))
    return calls


def assert_folded_matches_peft(model, x, autocast: bool, whole_layer: bool, monkeypatch) -> list[torch.Tensor]:
    """A folded copy of `model` (peft's forward forbidden) gives its loss and gradients; returns the gradients."""
    folded = copy.deepcopy(model)
    assert fold_lora_adds(folded, whole_layer) == 2 * 7  # q, k, v, o, gate, up, down per layer
    if whole_layer and autocast:  # a bf16 base: the adapters' casts made once per forward, as on a GPU
        assert precast_adapters(folded) == 14
        adapters = [p for n, p in folded.named_parameters() if "lora_" in n]
        assert len({p.untyped_storage().data_ptr() for p in adapters}) == 1  # views of one flat buffer
        grouped = [(m, s) for m in folded.modules() if (s := state_of(m)) is not None and s.w_ext is not None]
        serial_ = next(m for m in folded.modules() if type(m) is LoraLinear).lora_A.default.weight.dim() == 2
        assert len(grouped) == (10 if serial_ else 0)
        assert all(s.w_ext.shape[1] == m.in_features + 4 * len(s.group) for m, s in grouped)  # q/k/v, gate/up: rank 4
    la, ga = loss_and_grads(model, x, autocast)
    peft_forbidden(monkeypatch)
    calls = whole_layer_spy(monkeypatch)
    lb, gb = loss_and_grads(folded, x, autocast)
    serial = next(m for m in folded.modules() if type(m) is LoraLinear).lora_A.default.weight.dim() == 2
    if not whole_layer:
        assert not calls
    elif serial:  # per layer: q/k/v and gate/up grouped, o and down alone
        assert calls == {"GroupedLora": 4, "LoraLinearFn": 4}
    else:  # batched adapters are never grouped
        assert calls == {"LoraLinearFn": 14}
    assert close(la, lb, autocast)
    assert len(ga) == 28 and all(close(a, b, autocast) for a, b in zip(ga, gb, strict=True))
    return ga


@pytest.mark.parametrize("whole_layer", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_serial_adapters_match_peft(autocast, whole_layer, monkeypatch):
    base = llama(torch.bfloat16 if autocast else torch.float32)
    model = perturbed(prepare(base, "A:r", 4, 1.0, "all-linear", seed=3))  # scaling 1/4: a wrong scale shows
    assert_folded_matches_peft(model, torch.randint(0, CFG.vocab_size, (2, 9)), autocast, whole_layer, monkeypatch)


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_adapters_with_biases_and_fewer_kv_heads_match_peft(autocast, monkeypatch):
    """q/k/v with biases (Qwen2's) and k/v narrower than q (grouped-query attention): the group's [W | B]
    matrices differ in height and each output has its own bias (random, so a dropped or misplaced one shows;
    small enough that attention's softmax stays soft, or bf16 gradients of q and k are noise for peft too)."""
    cfg = LlamaConfig(**{**CFG.to_dict(), "attention_bias": True, "num_key_value_heads": 1})
    base = llama(torch.float32, cfg)
    for m in base.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_(0, 0.05)
    model = perturbed(prepare(base.to(torch.bfloat16 if autocast else torch.float32), "A:r", 4, 1.0,
                              "all-linear", seed=3))  # fmt: skip
    x = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_folded_matches_peft(model, x, autocast, True, monkeypatch)


@pytest.mark.parametrize("whole_layer", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_batched_adapters_match_peft(autocast, whole_layer, monkeypatch):
    recipe = Recipe.of(name="t", model="embedded:tiny", ranks="4", regimes="A:r")
    spec = make_spec(recipe, "A:r", 4, 0.01, 0)
    base = llama(torch.bfloat16 if autocast else torch.float32)
    model, params, _ = build(base, spec, recipe.replace(targets="all-linear"), k=3)
    perturbed(model)
    x = torch.randint(0, CFG.vocab_size, (6, 9))  # 3 trials × 2 rows
    grads = assert_folded_matches_peft(model, x, autocast, whole_layer, monkeypatch)
    assert all(g.shape[0] == 3 for g in grads)


def test_what_cannot_be_folded_runs_peft():
    model = perturbed(prepare(llama(), "A:r", 4, 1.0, "all-linear", seed=3))
    fold_lora_adds(model)
    x = torch.randint(0, CFG.vocab_size, (1, 5))
    with torch.no_grad(), model.disable_adapter():  # disabled adapters: the base alone
        off = model(input_ids=x).logits
        assert torch.allclose(off, llama()(input_ids=x).logits, atol=1e-6)


def test_a_bf16_base_without_autocast_runs_peft():
    """fp32 adapters on a bf16 base outside autocast: addmm would mix dtypes, so peft's forward runs."""
    model = perturbed(prepare(llama().to(torch.bfloat16), "A:r", 4, 1.0, "all-linear", seed=3))
    folded = copy.deepcopy(model)
    fold_lora_adds(folded)
    x = torch.randint(0, CFG.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(folded(input_ids=x).logits, model(input_ids=x).logits)


def test_trials_train_through_the_folded_layers(micro_recipe_path, monkeypatch):
    """The serial and the batched trial paths fold their adapters: with peft's own forward forbidden, LoRA
    trials still train."""
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.sweep.trainer import Trainer
    from mua_cli.train.batched import run_batched
    from mua_cli.train.loop import run_trial

    micro = load_recipe(str(micro_recipe_path))
    runner = Trainer.load(micro, "cpu")
    peft_forbidden(monkeypatch)
    specs = [make_spec(micro, "B:1", 2, lr, 0) for lr in (2.0**-8, 2.0**-6)]
    serial = run_trial(specs[0], runner.base, runner.data, micro, "cpu")
    batched = run_batched(specs, runner.base, runner.data, micro, "cpu")
    assert serial.status == "ok", serial.error
    assert [r.status for r in batched] == ["ok", "ok"], batched[0].error
    assert batched[0].loss_curve == pytest.approx(serial.loss_curve, rel=1e-4)


def test_grouped_siblings_on_other_inputs_compute_alone(monkeypatch):
    """q_proj's call computes k and v too, for the same input tensor only: k_proj given another tensor, or
    v_proj the same one changed in place since, get their outputs for what they were given (peft's)."""
    model = perturbed(prepare(llama(), "A:r", 4, 1.0, "all-linear", seed=3))
    attn = model.base_model.model.model.layers[0].self_attn
    x1, x2 = torch.randn(2, 5, CFG.hidden_size), torch.randn(2, 5, CFG.hidden_size)
    with torch.no_grad():
        want_k2, want_v1 = attn.k_proj(x2), attn.v_proj(x1 + 1)
    fold_lora_adds(model, whole_layer=True)
    calls = whole_layer_spy(monkeypatch)
    with torch.no_grad():
        attn.q_proj(x1)
        got_k2 = attn.k_proj(x2)  # another tensor
        x1.add_(1)
        got_v1 = attn.v_proj(x1)  # the same tensor, changed in place
    assert calls == {"GroupedLora": 3}  # a call that finds nothing computed for its input computes the group
    assert torch.allclose(got_k2, want_k2, atol=1e-5) and torch.allclose(got_v1, want_v1, atol=1e-5)


def test_precast_weights_changed_since_the_copy_are_cast_again():
    """A layer called on its own (no forward of the whole model, so no copy) after its weights changed uses
    its new weights, not the copy made at the last forward."""
    model = perturbed(prepare(llama(torch.bfloat16), "A:r", 4, 1.0, "all-linear", seed=3))
    fold_lora_adds(model, whole_layer=True)
    precast_adapters(model)
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x)  # copies the casts
        o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
        h = torch.randn(2, 9, CFG.hidden_size)
        with torch.no_grad():
            o_proj.lora_B.default.weight.mul_(3)
            got = o_proj(h)
            want = o_proj.base_layer(h) + o_proj.lora_B.default(o_proj.lora_A.default(h)) * o_proj.scaling["default"]
    assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()


def test_an_fp32_base_under_bf16_autocast_matches_peft(monkeypatch):
    """An fp32 base in a step under autocast (the whole-layer function needs the base in the step's dtype, so
    the layer takes the 2-D addmm path): bf16 outputs, and the adapter's B cast for the in-place add."""
    model = perturbed(prepare(llama(torch.float32), "A:r", 4, 1.0, "all-linear", seed=3))
    assert_folded_matches_peft(model, torch.randint(0, CFG.vocab_size, (2, 9)), True, False, monkeypatch)
