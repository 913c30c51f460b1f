"""Base models: the embedded default (a tiny byte-level Llama, pretrained once and cached, or shipped with the
package for `recipes/tiny.yaml`) or a Hugging Face model by hub name or local folder."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import MuaError
from ..spec.config import ModelSpec
from .data import BYTE_VOCAB, TokenData, load_text_data

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


SIZE_HINT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def cache_dir() -> Path:
    root = os.environ.get("MUA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mua"
    return Path(root)


def embedded_config(m: ModelSpec) -> LlamaConfig:
    known = set(LlamaConfig().to_dict())
    for key in m.config:  # a typo would otherwise be kept as an unused attribute, and the model built without it
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; LlamaConfig's keys include {', '.join(SIZE_HINT)}"
            raise MuaError(f"recipe: model_config: unknown key {key!r}{hint}")
    cfg = {**TINY_DEFAULTS, **m.config, "vocab_size": BYTE_VOCAB}
    try:
        return LlamaConfig(**cfg)
    except Exception as e:  # noqa: BLE001 — transformers' own checks (head sizes, rotary dimensions, types)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        shape = f"hidden_size {cfg.get('hidden_size')}, num_attention_heads {cfg.get('num_attention_heads')}"
        why = lines[-1] if lines else type(e).__name__
        raise MuaError(f"recipe: model_config ({shape}) is not a valid model: {why}") from None


def embedded_key(m: ModelSpec, seq_len: int) -> str:
    blob = json.dumps(
        {
            "config": embedded_config(m).to_dict(),
            "pretrain": {**PRETRAIN_DEFAULTS, **m.pretrain},
            "seq_len": seq_len,
            "v": 1,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_base(m: ModelSpec, seq_len: int, on_note=None) -> torch.nn.Module:
    """The frozen starting point of every trial, on the CPU in fp32 (trials move their copy).

    For seq-cls / image-cls models, use `load_hf` with the data's labels (see workload.load_workload)."""
    if m.name.startswith("embedded:"):
        if m.task != "causal-lm":
            raise MuaError(f"the embedded model is a causal LM; task {m.task!r} needs --model NAME_OR_PATH")
        return load_embedded(m, seq_len, on_note)
    return load_hf(m.name, m.task).model


def embedded_folder(m: ModelSpec, seq_len: int) -> Path:
    """Where the embedded model of this recipe is cached once pretrained."""
    return cache_dir() / f"embedded-{m.name.split(':', 1)[1]}-{embedded_key(m, seq_len)}"


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "embedded"  # package data: pretrained weights (shipped_folder)


def embedded_settings(m: ModelSpec, seq_len: int) -> dict:
    """What a recipe says of its embedded model: its shape, its pretraining and the window length; the name of
    shipped weights. (`embedded_key`, the cache's, also hashes transformers' resolved config, which changes with
    transformers' version.)"""
    return {
        "model": m.name,
        "config": {**TINY_DEFAULTS, **m.config, "vocab_size": BYTE_VOCAB},
        "pretrain": {**PRETRAIN_DEFAULTS, **m.pretrain},
        "seq_len": seq_len,
    }


def shipped_name(m: ModelSpec, seq_len: int) -> str:
    blob = json.dumps(embedded_settings(m, seq_len), sort_keys=True, default=str)
    return f"{m.name.split(':', 1)[1]}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def shipped_folder(m: ModelSpec, seq_len: int) -> Path | None:
    """The pretrained weights shipped inside the package for exactly these settings (recipes/tiny.yaml's),
    or None. The folder holds what `pretrain` made on the CPU (fp32, config.json and model.safetensors) and the
    settings it was made from; `python benchmarks/ship_embedded.py` makes it again and checks it."""
    folder = SHIPPED_DIR / shipped_name(m, seq_len)
    try:
        settings = json.loads((folder / "settings.json").read_text())
    except (OSError, ValueError):
        return None
    same = json.dumps(settings, sort_keys=True) == json.dumps(
        embedded_settings(m, seq_len), sort_keys=True, default=str
    )
    return folder if same and (folder / "model.safetensors").is_file() else None


def load_embedded(m: ModelSpec, seq_len: int, on_note=None) -> torch.nn.Module:
    """The embedded model for this recipe: shipped with the package (recipes/tiny.yaml's settings: every machine
    then starts from the same weights), else from the cache, else pretrained now (seconds to minutes on a CPU)
    and cached."""
    name = m.name.split(":", 1)[1]
    if name != "tiny":
        raise MuaError(f"no embedded model {name!r}; the embedded model is 'embedded:tiny'")
    if (shipped := shipped_folder(m, seq_len)) is not None:
        return LlamaForCausalLM.from_pretrained(shipped)
    folder = embedded_folder(m, seq_len)
    if (folder / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(folder)
    pre = {**PRETRAIN_DEFAULTS, **m.pretrain}
    if on_note:
        on_note(f"pretraining the embedded model on {pre['data']} ({pre['steps']} steps, cached in {folder})")
    t0 = time.perf_counter()
    model = pretrain(embedded_config(m), load_text_data(pre["data"], seq_len, 0.0), pre)
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
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # a training step keeps no KV cache
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "image-cls": "AutoModelForImageClassification",
}


@dataclass
class Loaded:
    """A Hugging Face model as loaded, and the weights it did not find in the checkpoint (a new head)."""

    model: torch.nn.Module
    new_weights: list[str] = field(default_factory=list)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def local_or_hub(name_or_path: str, what: str) -> None:
    """A path-like name must exist here; anything else is a hub name (resolved from the local HF cache)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MuaError(f"{what} {name_or_path} is a file; give the folder that holds config.json")
        if not (p / "config.json").is_file():
            raise MuaError(f"{what} folder {name_or_path} holds no config.json (save it with save_pretrained)")
        if "auto_map" in (p / "config.json").read_text(errors="replace"):
            raise MuaError(
                f"{what} {name_or_path} runs code of its own (auto_map in its config.json), which mua does not run "
                "(no trust_remote_code): use a model whose architecture transformers has built in"
            )
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise MuaError(f"{what} {name_or_path} does not exist")


def load_hf(
    name_or_path: str,
    task: str,
    labels: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Loaded:
    """Any Hugging Face causal LM, sequence classifier or image classifier, by hub name or local folder.

    Classifiers get `len(labels)` outputs; a head that does not fit (or is missing) is newly initialized, and its
    weights are listed in `new_weights`."""
    import transformers

    if task not in AUTO_CLASSES:
        raise MuaError(f"unknown task {task!r}; choose from {', '.join(AUTO_CLASSES)}")
    local_or_hub(name_or_path, "model")
    quiet_transformers()
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs: dict = {"dtype": dtype, "trust_remote_code": False}  # never a model's own code, and never a prompt
    if task != "causal-lm":
        if not labels or len(labels) < 2:
            raise MuaError(f"classification needs at least 2 classes; the data has {len(labels or [])}")
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    try:
        # a new head is drawn from the global RNG: seeded here, every slot and every run starts from the same one
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, info = auto.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise MuaError(f"cannot load model {name_or_path!r} for {task}: {_first_line(e)}") from None
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused what the file would build
        raise MuaError(
            f"model {name_or_path!r}: its weights file cannot be loaded safely (it holds objects that are not "
            f"tensors, which mua never unpickles: {_first_line(e)[:120]})"
        ) from None
    new = sorted(
        set(info.get("missing_keys") or ())
        | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()}
    )
    if getattr(model.config, "pad_token_id", None) is None and task == "seq-cls":
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return Loaded(model=model, new_weights=new)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def load_tokenizer(name_or_path: str):
    """The model's tokenizer (from its folder or hub name); a pad token is set where there is none."""
    from transformers import AutoTokenizer

    local_or_hub(name_or_path, "model")
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise MuaError(f"model folder {name_or_path} holds no tokenizer; save it beside the model (save_pretrained)")
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MuaError(f"cannot load the tokenizer of {name_or_path!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
    tok.padding_side = "right"
    return tok


def load_image_processor(name_or_path: str):
    """The model's image processor, or None where the folder has none (then the config's image size and a
    0.5 / 0.5 normalization are used)."""
    from transformers import AutoImageProcessor

    quiet_transformers()
    try:
        return AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hidden_size(model: torch.nn.Module) -> int | None:
    """The model's width n (base_n of the per-layer LR rule)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
