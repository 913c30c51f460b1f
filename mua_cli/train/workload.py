"""A recipe's workload: the base model and its task's data, matched (tokenizer, labels, image processor).

Each task loads through its own builder (BUILDERS); the embedded models, byte-level with no tokenizer, have one
of their own. What loading found out (the data's size, the head, the LoRA targets) comes back as notes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import accel
from ..errors import MuaError
from ..spec.config import DataSpec, ModelSpec
from ..spec.recipe import Recipe
from .adapters import head_modules, lora_target_names
from .data import load_lm_data
from .models import hidden_size, load_base, load_hf, load_image_processor, load_tokenizer
from .sources import (
    Records,
    is_messages,
    open_source,
    record_labels,
    record_texts,
    render_messages,
    split_indices,
    text_fields,
)
from .tasks import EVAL_MAX_BATCHES, ImageClsTask, LMTask, TextClsTask, image_column

Task = LMTask | TextClsTask | ImageClsTask


@dataclass
class Workload:
    base: torch.nn.Module
    task: Task
    notes: list[str] = field(default_factory=list)


def compute_dtype(m: ModelSpec, device: str) -> torch.dtype:
    """The frozen weights' dtype: the recipe's on a GPU, float32 on the CPU."""
    return torch.bfloat16 if m.dtype == "bfloat16" and accel.is_gpu(device) else torch.float32


@dataclass(frozen=True)
class Need:
    """What a builder reads of the recipe: the model, the data, and how much of the data the trials use."""

    model: ModelSpec
    data: DataSpec
    steps: int
    batch_size: int
    device: str
    dtype: torch.dtype


def _embedded(n: Need, on_note) -> tuple[torch.nn.Module, Task, list]:
    d = n.data
    base = load_base(n.model, d.seq_len, on_note)
    task = LMTask(load_lm_data(d.source, d.seq_len, d.eval_fraction, d.text_field))
    return (base.to(n.dtype) if n.dtype != torch.float32 else base), task, []


def _embedded_encoder(n: Need, on_note) -> tuple[torch.nn.Module, Task, list]:
    """The embedded encoder is an ordinary Hugging Face folder (weights, config, byte-level tokenizer), shipped or
    cached: from there it loads as any other classifier does."""
    from . import encoder

    if n.data.seq_len > encoder.MAX_TOKENS - 2:
        raise MuaError(f"seq_len {n.data.seq_len}: the embedded encoder reads at most {encoder.MAX_TOKENS - 2} bytes")
    folder = encoder.model_folder(on_note)
    return _seq_cls(dataclasses.replace(n, model=dataclasses.replace(n.model, name=str(folder))), on_note)


def _causal_lm(n: Need, on_note) -> tuple[torch.nn.Module, Task, list]:
    d, tok = n.data, load_tokenizer(n.model.name)
    budget = 2 * n.steps * n.batch_size * (d.seq_len + 1)
    data = load_lm_data(d.source, d.seq_len, d.eval_fraction, d.text_field, tok, max_tokens=budget)
    loaded = load_hf(n.model.name, "causal-lm", dtype=n.dtype)
    _check_vocab(loaded.model, int(max(data.train.max(), data.eval.max())), n.model.name)
    return loaded.model, LMTask(data), loaded.new_weights


def _seq_cls(n: Need, on_note) -> tuple[torch.nn.Module, Task, list]:
    tok = load_tokenizer(n.model.name)
    records = _records_of(n.data.source, "seq-cls")
    labels, names = record_labels(records, n.data.label_field)
    rows, n_train = select_examples(len(records), n)
    ids = _tokenize_inputs(records, n.data, tok, rows)
    fixed = accel.is_gpu(n.device)  # one shape for CUDA graphs; the CPU pads each batch only as needed
    task = TextClsTask(ids, [labels[i] for i in rows], names, tok.pad_token_id or 0, n_train, fixed)
    loaded = load_hf(n.model.name, "seq-cls", labels=names, dtype=n.dtype)
    if tok.pad_token_id is not None:
        loaded.model.config.pad_token_id = tok.pad_token_id
    _check_vocab(loaded.model, int(task.input_ids.max()), n.model.name)
    return loaded.model, task, loaded.new_weights


def _image_cls(n: Need, on_note) -> tuple[torch.nn.Module, Task, list]:
    records = _records_of(n.data.source, "image-cls")
    labels, names = record_labels(records, n.data.label_field)
    column = image_column(records, n.data.text_field)
    rows, n_train = select_examples(len(records), n)
    loaded = load_hf(n.model.name, "image-cls", labels=names, dtype=n.dtype)
    cfg = loaded.model.config
    task = ImageClsTask(
        records,
        column,
        rows,
        [labels[i] for i in rows],
        names,
        n_train,
        load_image_processor(n.model.name),
        int(getattr(cfg, "image_size", 224) or 224),
        int(getattr(cfg, "num_channels", 3) or 3),
    )
    return loaded.model, task, loaded.new_weights


Builder = Callable[[Need, Callable | None], tuple[torch.nn.Module, Task, list]]
BUILDERS: dict[str, Builder] = {"causal-lm": _causal_lm, "seq-cls": _seq_cls, "image-cls": _image_cls}


def load_workload(recipe: Recipe, device: str = "cpu", on_note=None) -> Workload:
    """The base model (frozen, on the CPU) and the task's data for a recipe."""
    notes: list[str] = []
    m, o = recipe.model, recipe.optim
    need = Need(m, recipe.data, o.steps, o.batch_size, device, compute_dtype(m, device))
    if m.dtype == "bfloat16" and need.dtype == torch.float32:
        notes.append("dtype bfloat16 is for GPUs: on the CPU the model runs in float32")
    build = (_embedded_encoder if m.task == "seq-cls" else _embedded) if m.embedded else BUILDERS[m.task]
    base, task, new = build(need, on_note)
    notes += _describe(recipe, base, task, new)
    for n in notes:
        if on_note:
            on_note(n)
    return Workload(base=base, task=task, notes=notes)


def _describe(recipe: Recipe, base: torch.nn.Module, task: Task, new: list) -> list[str]:
    notes = [f"data {recipe.data.source}: {task.describe()}"]
    head = head_modules(base, recipe.model.task)
    if head:
        state = "new (initialized for the data's classes)" if new else "from the checkpoint"
        notes.append(
            f"head {', '.join(head)} ({state}) is not LoRA-adapted: it trains in full at the fixed head_lr "
            f"{recipe.optim.head_lr:g} in every trial, LoRA and full finetuning alike"
        )
    if recipe.lora_ranks:
        names = lora_target_names(base, recipe.model.targets, head)
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        given = recipe.model.targets if isinstance(recipe.model.targets, str) else ",".join(recipe.model.targets)
        notes.append(f"LoRA targets ({given}): {len(names)} layers, {', '.join(kinds)}")
    if recipe.optim.per_layer_lr:
        notes.append(
            f"per-layer LR: fan-in scaling with base_n = {hidden_size(base)} (Init[B] and full finetuning "
            "base_n/n_in, Init[A] its square root)"
        )
    return notes


def _records_of(spec: str, task: str) -> Records:
    source = open_source(spec)
    if source.records is None:
        raise MuaError(
            f"task {task} needs records with inputs and labels (JSONL, CSV, a dataset or an image "
            f"folder); {spec} is plain text"
        )
    if len(source.records) == 0:
        raise MuaError(f"dataset {spec} is empty")
    return source.records


def _check_vocab(model: torch.nn.Module, max_id: int, name: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and max_id >= emb.num_embeddings:
        raise MuaError(
            f"the tokenizer of {name} gives token id {max_id}, beyond the model's {emb.num_embeddings} "
            "embeddings: tokenizer and model do not match"
        )


def select_examples(n: int, need: Need) -> tuple[list[int], int]:
    """Record indices to use, training ones first, and how many are for training: a fixed shuffle split by
    eval_fraction; at most steps × batch_size training examples (one pass) and the held-out examples that
    evaluation reads, so a large dataset is not preprocessed whole."""
    train, held = split_indices(n, need.data.eval_fraction)
    train = train[: need.steps * need.batch_size]
    held = held[: need.batch_size * EVAL_MAX_BATCHES]
    return train + held, len(train)


def _tokenize_inputs(records: Records, d: DataSpec, tok, rows: list[int]) -> list[list[int]]:
    """Token ids per record, truncated to seq_len: one text field, or two as a pair (e.g. premise,hypothesis)."""
    fields = text_fields(records, d.text_field)
    if len(fields) == 2:
        cols = [[_as_text(v, tok) for v in records.column(f, rows)] for f in fields]
        enc = tok(cols[0], cols[1], truncation=True, max_length=d.seq_len)
    else:
        enc = tok(record_texts(records, d.text_field, tok, rows), truncation=True, max_length=d.seq_len)
    ids = list(enc["input_ids"])
    if not any(ids):
        raise MuaError(f"dataset {d.source} is empty: no text in {d.text_field!r}")
    return ids


def _as_text(value, tok) -> str:
    if is_messages(value):
        return render_messages(value, tok)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
