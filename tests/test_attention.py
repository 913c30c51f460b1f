"""Mask-free causal attention (attention.py): the same logits and gradients as the model's own SDPA with its
causal mask, no mask tensor even while transformers believes a CUDA stream is capturing, and left alone where
the mask is more than causal."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.utils.import_utils as import_utils
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from mua_cli.attention import NAME, drop_causal_mask, maskless_reason

SEQ = 12


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call's (attn_mask is None, is_causal), while transformers is told a stream is capturing."""
    calls: list[tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, bool(is_causal)))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    return calls


def test_maskless_model_matches_the_masked_one(sdpa_calls):
    own = _llama()
    maskless = copy.deepcopy(own)
    assert drop_causal_mask(maskless, SEQ)
    assert maskless.config._attn_implementation == NAME and own.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 32, (3, SEQ))
    out = [m(input_ids=ids, labels=ids, use_cache=False) for m in (own, maskless)]
    torch.testing.assert_close(out[1].logits, out[0].logits, atol=1e-5, rtol=1e-5)
    for o in out:
        o.loss.backward()
    for (name, a), b in zip(own.named_parameters(), maskless.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)
    n = own.config.num_hidden_layers  # the model's own calls come first (with transformers 5.24: a mask tensor)
    assert sdpa_calls[n:] == [(True, True)] * n  # the maskless model: causal flag, no mask tensor


def test_peft_copy_is_switched_too():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert drop_causal_mask(model, SEQ)
    assert model.base_model.model.config._attn_implementation == NAME


def test_left_alone_where_the_mask_is_more_than_causal():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=8)  # fmt: skip
    windowed = MistralForCausalLM(cfg)
    assert "sliding-window" in maskless_reason(windowed, SEQ)
    assert not drop_causal_mask(windowed, SEQ)
    assert windowed.config._attn_implementation == "sdpa"
    assert maskless_reason(windowed, 8) is None  # a window as long as the batch is plain causal
    eager = _llama()
    eager.config._attn_implementation = "eager"
    assert not drop_causal_mask(eager, SEQ)
    assert not drop_causal_mask(torch.nn.Linear(2, 2), SEQ)
