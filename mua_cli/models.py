"""Base models: the embedded default (a tiny byte-level Llama, pretrained once and cached) or a
Hugging Face model by hub name or local folder."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from .data import BYTE_VOCAB, TokenData, load_text_data
from .errors import MuaError
from .recipe import Recipe

TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
PRETRAIN_DEFAULTS = dict(data="embedded:shakespeare", steps=300, lr=3e-3, batch_size=16, seed=0)


def cache_dir() -> Path:
    root = os.environ.get("MUA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mua"
    return Path(root)


def embedded_config(recipe: Recipe) -> LlamaConfig:
    cfg = {**TINY_DEFAULTS, **recipe.model_config, "vocab_size": BYTE_VOCAB}
    return LlamaConfig(**cfg)


def embedded_key(recipe: Recipe) -> str:
    blob = json.dumps(
        {"config": embedded_config(recipe).to_dict(), "pretrain": {**PRETRAIN_DEFAULTS, **recipe.pretrain},
         "seq_len": recipe.seq_len, "v": 1},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_base(recipe: Recipe, on_note=None) -> torch.nn.Module:
    """The frozen starting point of every trial, on the CPU in fp32 (trials move their copy)."""
    if recipe.model.startswith("embedded:"):
        return load_embedded(recipe, on_note)
    return load_hf(recipe.model, recipe.task)


def load_embedded(recipe: Recipe, on_note=None) -> torch.nn.Module:
    name = recipe.model.split(":", 1)[1]
    if name != "tiny":
        raise MuaError(f"no embedded model {name!r}; the embedded model is 'embedded:tiny'")
    folder = cache_dir() / f"embedded-{name}-{embedded_key(recipe)}"
    if (folder / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(folder)
    pre = {**PRETRAIN_DEFAULTS, **recipe.pretrain}
    if on_note:
        on_note(f"pretraining the embedded model on {pre['data']} ({pre['steps']} steps, cached in {folder})")
    t0 = time.perf_counter()
    model = pretrain(embedded_config(recipe), load_text_data(pre["data"], recipe.seq_len, 0.0), pre)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps({**pre, "seconds": time.perf_counter() - t0}))
    try:
        tmp.rename(folder)  # atomic: a half-written cache is never picked up
    except OSError:  # another process won the race; use theirs
        pass
    return LlamaForCausalLM.from_pretrained(folder)


def pretrain(config: LlamaConfig, data: TokenData, pre: dict) -> LlamaForCausalLM:
    torch.manual_seed(pre["seed"])
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=pre["lr"], weight_decay=0.01)
    steps = int(pre["steps"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pre["lr"], total_steps=steps, pct_start=0.1)
    starts = data.batch_starts(pre["seed"], steps, int(pre["batch_size"]))
    model.train()
    for step in range(steps):
        batch = data.windows(data.train, starts[step])
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of windows of seq_len + 1 tokens."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def load_hf(name_or_path: str, task: str) -> torch.nn.Module:
    if task != "causal-lm":
        raise MuaError(f"task {task!r} is not supported yet")
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=torch.float32)
    except OSError as e:
        raise MuaError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
