"""`mua_cli.api.apply_regime`: a regime's init on a user's own peft model, the same as the sweep's trials get."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from mua_cli.api import apply_regime, lora_config
from mua_cli.errors import MuaError
from mua_cli.train.adapters import prepare

CFG = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)  # fmt: skip


def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


def loras(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}  # fmt: skip


@pytest.mark.parametrize(("regime", "rank", "peft_args"), [
    ("B:1", 8, {"lora_alpha": 8}), ("A:r", 16, {"lora_alpha": 1}), ("B:sqrt", 4, {"lora_alpha": 1, "use_rslora": True}),
])  # fmt: skip
def test_a_plain_peft_model_gets_the_sweeps_init(regime, rank, peft_args):
    """The user's own LoraConfig (peft's names, all linear layers) and apply_regime: the very tensors of the
    sweep's trial of that seed (train/adapters.prepare, the path every trial takes)."""
    sweep = loras(prepare(base(), regime, rank, 1.0, "all-linear", seed=3))
    mine = get_peft_model(base(), LoraConfig(r=rank, target_modules="all-linear", **peft_args))
    before = loras(mine)
    assert apply_regime(mine, regime, seed=3) == len(sweep) == 14
    after = loras(mine)
    assert after.keys() == sweep.keys()
    for name, (a, b) in after.items():
        torch.testing.assert_close(a, sweep[name][0], rtol=0, atol=0)
        torch.testing.assert_close(b, sweep[name][1], rtol=0, atol=0)
        assert not torch.equal(a, before[name][0])  # peft's Kaiming A is replaced


def test_the_inits_distributions():
    model = get_peft_model(base(), lora_config("B:1", 32))
    apply_regime(model, "B:1", seed=0)
    bs = torch.cat([b.flatten() for a, b in loras(model).values()])
    assert all(torch.count_nonzero(a) == 0 for a, _ in loras(model).values())
    assert bs.std().item() * math.sqrt(32) == pytest.approx(1, abs=0.05)
    model = get_peft_model(base(), lora_config("A:r", 32))
    apply_regime(model, "A:r", seed=0)
    for a, b in loras(model).values():
        assert torch.count_nonzero(b) == 0 and a.std().item() * math.sqrt(a.shape[1]) == pytest.approx(1, abs=0.1)
    # B A = 0 either way: the model's output is the base's
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base()(input_ids=x).logits)


def test_lora_config_is_the_sweeps():
    c = lora_config("B:1", 128, targets="q_proj,v_proj", task_type="CAUSAL_LM")
    assert (c.r, c.lora_alpha, c.use_rslora, c.lora_dropout) == (128, 128, False, 0.0)
    assert set(c.target_modules) == {"q_proj", "v_proj"} and c.task_type == "CAUSAL_LM"
    c = lora_config("A:sqrt", 64, alpha0=2.0)
    assert (c.lora_alpha, c.use_rslora, c.target_modules) == (2.0, True, "all-linear")


def test_a_model_with_another_alpha_is_refused():
    model = get_peft_model(base(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))  # α 2, not B:1's 1
    before = loras(model)
    with pytest.raises(MuaError, match=r"scale by another α than B:1's .*lora_alpha=8, use_rslora=False"):
        apply_regime(model, "B:1")
    assert all(torch.equal(a, before[n][0]) for n, (a, _) in loras(model).items())  # left as it was
    with pytest.raises(MuaError, match="no LoRA layer"):
        apply_regime(copy.deepcopy(model), "B:1", adapter="other")
    with pytest.raises(MuaError, match="unknown regime"):
        apply_regime(model, "C:1")
