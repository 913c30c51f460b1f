"""Mask-free attention (attention.py): the same logits and gradients as the model's own SDPA with its mask
(a causal LM's causal one, a ViT's all-ones one), no mask tensor even while transformers believes a CUDA stream
is capturing, and left alone where the mask is more than causal."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.utils.import_utils as import_utils
from torch.nn.attention import SDPBackend
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from mua_cli.accel.attention import (
    GPU_ORDER,
    GRAPH_SAFE,
    NAME,
    drop_mask,
    kernels,
    maskless_reason,
    step_kernels,
)

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
    assert drop_mask(maskless, SEQ)
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


def test_maskless_vit_matches_its_own_and_stays_bidirectional(sdpa_calls):
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, num_labels=3, attn_implementation="sdpa")  # fmt: skip
    own = ViTForImageClassification(cfg).eval()
    maskless = copy.deepcopy(own)
    assert drop_mask(maskless, SEQ)
    pixels, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    out = [m(pixel_values=pixels, labels=labels) for m in (own, maskless)]
    torch.testing.assert_close(out[1].logits, out[0].logits, atol=1e-5, rtol=1e-5)
    for o in out:
        o.loss.backward()
    for (name, a), b in zip(own.named_parameters(), maskless.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)
    n = cfg.num_hidden_layers
    assert sdpa_calls[n:] == [(True, False)] * n  # the maskless model: no mask tensor, and not made causal


def test_peft_copy_is_switched_too():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert drop_mask(model, SEQ)
    assert model.base_model.model.config._attn_implementation == NAME


def test_steps_of_a_mask_free_model_may_use_cudnn_attention():
    model = _llama()
    assert step_kernels(model) == GRAPH_SAFE and SDPBackend.CUDNN_ATTENTION not in GRAPH_SAFE
    assert drop_mask(model, SEQ)
    assert step_kernels(model) == GPU_ORDER and GPU_ORDER[0] == SDPBackend.CUDNN_ATTENTION


def test_threads_hold_one_attention_setting_together():
    """SDPA's flags are process-wide. With a plain sdpa_kernel, the first thread out would restore cuDNN's
    kernel while the second still runs without it; `kernels` keeps the setting until the last is out, and a
    thread that asks for another order waits for it."""
    import threading

    cudnn = torch.backends.cuda.cudnn_sdp_enabled
    assert cudnn()
    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))
    seen: dict[str, bool] = {}

    def a():
        with kernels(GRAPH_SAFE):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with kernels(GRAPH_SAFE):
            b_in.set()
            a_out.wait(5)
            seen["b after a left"] = cudnn()
            b_done.set()

    def other():
        with kernels(GPU_ORDER):
            seen["other waited for b"] = b_done.is_set()
            seen["other's order"] = cudnn()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    a_in.wait(5)
    threads.append(threading.Thread(target=other))
    threads[-1].start()
    for t in threads:
        t.join(10)
    assert seen == {"b after a left": False, "other waited for b": True, "other's order": True}
    assert cudnn()  # the last out restored torch's own setting


def test_left_alone_where_the_mask_is_more_than_causal():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=8)  # fmt: skip
    windowed = MistralForCausalLM(cfg)
    assert "sliding-window" in maskless_reason(windowed, SEQ)
    assert not drop_mask(windowed, SEQ)
    assert windowed.config._attn_implementation == "sdpa"
    assert maskless_reason(windowed, 8) is None  # a window as long as the batch is plain causal
    eager = _llama()
    eager.config._attn_implementation = "eager"
    assert not drop_mask(eager, SEQ)
    assert not drop_mask(torch.nn.Linear(2, 2), SEQ)
