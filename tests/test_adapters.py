import math

import torch
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from mua_cli.train.adapters import prepare

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_init_b_zero_a_and_b_std_one_over_sqrt_r():
    rank = 16
    model = prepare(base(), "B:1", rank, 1.0, "all-linear", seed=0)
    layers = lora_layers(model)
    assert len(layers) == 7  # q, k, v, o, gate, up, down
    bs = torch.cat([m.lora_B["default"].weight.flatten() for m in layers])
    for m in layers:
        assert torch.count_nonzero(m.lora_A["default"].weight) == 0
    assert abs(bs.std().item() * math.sqrt(rank) - 1) < 0.05


def test_init_a_std_one_over_sqrt_fan_in_and_zero_b():
    model = prepare(base(), "A:r", 8, 1.0, "all-linear", seed=0)
    for m in lora_layers(model):
        a = m.lora_A["default"].weight
        assert torch.count_nonzero(m.lora_B["default"].weight) == 0
        assert abs(a.std().item() * math.sqrt(a.shape[1]) - 1) < 0.15


def test_output_unchanged_at_step_zero_for_both_inits():
    b = base()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = b(input_ids=x).logits
        for regime in ("A:r", "B:1", "B:sqrt", "A:1"):
            out = prepare(b, regime, 4, 1.0, "all-linear", seed=1)(input_ids=x).logits
            torch.testing.assert_close(out, ref)


def test_scaling_and_peft_values_per_regime():
    model = prepare(base(), "B:1", 8, 1.0, "all-linear", seed=0)
    cfg = model.peft_config["default"]
    assert cfg.lora_alpha == 8 and not cfg.use_rslora
    assert lora_layers(model)[0].scaling["default"] == 1.0
    model = prepare(base(), "A:sqrt", 16, 2.0, "all-linear", seed=0)
    assert lora_layers(model)[0].scaling["default"] == 2.0 / 4


def test_base_is_not_modified_and_seeds_are_reproducible():
    b = base()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    m1 = prepare(b, "B:1", 4, 1.0, "all-linear", seed=3)
    m2 = prepare(b, "B:1", 4, 1.0, "all-linear", seed=3)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k])
    w1 = lora_layers(m1)[0].lora_B["default"].weight
    w2 = lora_layers(m2)[0].lora_B["default"].weight
    assert torch.equal(w1, w2) and w1.abs().sum() > 0


def test_full_finetuning_trains_every_parameter():
    model = prepare(base(), "full", 0, 1.0, "all-linear", seed=0)
    assert all(p.requires_grad for p in model.parameters())


def test_skipping_peft_input_casts_is_exact_under_autocast():
    """Under bf16 autocast peft's cast of each LoRA input to the adapter's fp32 is undone by autocast before the
    matmul, so skipping it (what a GPU step does) changes no loss and no gradient."""
    from mua_cli.accel import skip_input_casts

    x = torch.randint(0, CFG.vocab_size, (2, 12))
    outs = []
    for skip in (False, True):
        model = prepare(base().to(torch.bfloat16), "A:r", 4, 1.0, "all-linear", seed=3)
        for layer in lora_layers(model):  # B ≠ 0, so that the adapters' branch counts
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        if skip:
            skip_input_casts(model)
        assert all(m.cast_input_dtype_enabled is not skip for m in lora_layers(model))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x).logits.float().logsumexp(-1).mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        outs.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = outs
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == 2 * len(lora_layers(model)) and all(g.abs().sum() > 0 for g in grads_a)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
