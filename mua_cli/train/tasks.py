"""Per-task batches, loss and evaluation (causal LM, sequence classification, image classification), and
loading a workload: the base model and its data, matched (tokenizer, labels, image processor).

Every task gives the trainer the same four things: `train_batches(seed, steps, batch_size, device)` → a
function from step to batch (fixed by the seed: every LR of one seed sees the same data), `loss(model, batch)`,
`evaluate(model, batch_size, device)` → {"loss", and "accuracy" for classifiers}, and `kind`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import MuaError
from ..spec.recipe import Recipe
from .data import (
    Records,
    TokenData,
    is_messages,
    load_lm_data,
    open_source,
    record_labels,
    record_texts,
    render_messages,
    split_indices,
    text_fields,
)
from .models import hidden_size, lm_loss, load_base, load_hf, load_image_processor, load_tokenizer

EVAL_MAX_BATCHES = 16  # classification: held-out examples evaluated per trial, in batches
PAD_MULTIPLE = 16  # text batches are padded to a multiple of this: few distinct shapes for the GPU's kernels


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def _epoch_order(n: int, seed: int, total: int) -> torch.Tensor:
    """`total` example positions: seeded permutations of n, one epoch after another."""
    g = torch.Generator().manual_seed(10_000 + seed)
    chunks, have = [], 0
    while have < total:
        chunks.append(torch.randperm(n, generator=g))
        have += n
    return torch.cat(chunks)[:total]


class LMTask:
    """Next-token prediction on windows of a packed token stream (the embedded default's path)."""

    kind = "causal-lm"
    fixed_shape = True  # every batch has one shape: a CUDA graph can replay the step (graphed.py)

    def __init__(self, data: TokenData):
        self.data = data

    def describe(self) -> str:
        d = self.data
        return f"{len(d.train):,} training tokens, {len(d.eval):,} held out, windows of {d.seq_len}"

    def train_batches(self, seed: int, steps: int, batch_size: int, device: str) -> Callable[[int], torch.Tensor]:
        starts = self.data.batch_starts(seed, steps, batch_size)
        tokens = self.data.train.to(device)
        starts = starts.to(device)
        return lambda step: self.data.windows(tokens, starts[step])

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, batch)

    def evaluate(self, model: torch.nn.Module, batch_size: int, device: str) -> dict:
        losses = [float(lm_loss(model, b.to(device))) for b in self.data.eval_batches(batch_size)]
        return {"loss": sum(losses) / len(losses)}


class _ClassTask:
    """Shared by the classifiers: labelled examples, the first `n_train` for training, the rest held out."""

    kind = ""
    fixed_shape = True

    def __init__(self, labels: list[int], names: list[str], n_train: int):
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.names = names
        if n_train == 0:
            raise MuaError("the dataset has no training examples left after the held-out split")
        self.train_idx = torch.arange(n_train)
        self.eval_idx = torch.arange(n_train, len(labels))
        if len(self.eval_idx) == 0:
            self.eval_idx = self.train_idx[: min(n_train, 64)]

    def describe(self) -> str:
        n_train, n_eval = len(self.train_idx), len(self.eval_idx)
        return f"{n_train:,} training and {n_eval:,} held-out examples, {len(self.names)} classes"

    def batch(self, idx: torch.Tensor, device: str) -> dict:
        raise NotImplementedError

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def train_batches(self, seed: int, steps: int, batch_size: int, device: str) -> Callable[[int], dict]:
        order = self.train_idx[_epoch_order(len(self.train_idx), seed, steps * batch_size)].view(steps, batch_size)
        return lambda step: self.batch(order[step], device)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return _ce(self.logits(model, batch), batch["labels"])

    def eval_chunks(self, batch_size: int) -> list[torch.Tensor]:
        """The held-out examples a trial is scored on, in batches."""
        idx = self.eval_idx[: batch_size * EVAL_MAX_BATCHES]
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]

    def evaluate(self, model: torch.nn.Module, batch_size: int, device: str) -> dict:
        total, correct, n = 0.0, 0, 0
        for idx in self.eval_chunks(batch_size):
            batch = self.batch(idx, device)
            logits = self.logits(model, batch).float()
            total += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
        return {"loss": total / n, "accuracy": correct / n}


class TextClsTask(_ClassTask):
    """Sequence classification: token ids truncated to seq_len, cross-entropy on the labels. Padded per batch
    (to a multiple of PAD_MULTIPLE), or with `fixed` every batch to the longest example's width: one shape, so
    that a GPU replays the step as a CUDA graph and trials batch (the mask keeps the padding out: the same loss)."""

    kind = "seq-cls"

    def __init__(self, ids: list[list[int]], labels: list[int], names: list[str], pad_id: int, n_train: int,
                 fixed: bool = False):  # fmt: skip
        super().__init__(labels, names, n_train)
        lengths = [max(1, len(x)) for x in ids]
        width = -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE
        self.input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            self.input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.fixed_shape = fixed

    def batch(self, idx: torch.Tensor, device: str) -> dict:
        width = self.input_ids.shape[1]
        if not self.fixed_shape:
            width = min(width, -(-int(self.lengths[idx].max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
        mask = torch.arange(width)[None, :] < self.lengths[idx][:, None]
        return {
            "input_ids": self.input_ids[idx, :width].to(device),
            "attention_mask": mask.long().to(device),
            "labels": self.labels[idx].to(device),
        }


class ImageClsTask(_ClassTask):
    """Image classification: images decoded and preprocessed on first use (then cached), cross-entropy."""

    kind = "image-cls"

    def __init__(
        self,
        records: Records,
        column: str,
        rows: list[int],
        labels: list[int],
        names: list[str],
        n_train: int,
        processor=None,
        image_size: int = 224,
        channels: int = 3,
    ):
        super().__init__(labels, names, n_train)
        self.records, self.column, self.rows, self.processor = records, column, rows, processor
        self.image_size, self.channels = image_size, channels
        self._cache: dict[int, torch.Tensor] = {}

    def pixels(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            image = _to_pil(self.records.cell(self.rows[i], self.column), self.records.name).convert(
                "L" if self.channels == 1 else "RGB"
            )
            if self.processor is not None:
                x = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
            else:  # no image processor saved with the model: resize to the config's size, normalize to [-1, 1]
                import numpy as np

                arr = np.asarray(image.resize((self.image_size, self.image_size)), dtype=np.float32) / 255.0
                x = torch.from_numpy(arr.reshape(self.image_size, self.image_size, -1)).permute(2, 0, 1)
                x = (x - 0.5) / 0.5
            self._cache[i] = x.to(torch.float16)
        return self._cache[i]

    def batch(self, idx: torch.Tensor, device: str) -> dict:
        pixels = torch.stack([self.pixels(int(i)) for i in idx]).float()
        return {"pixel_values": pixels.to(device), "labels": self.labels[idx].to(device)}


def _to_pil(value, source: str):
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            import io

            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        if isinstance(value, str):
            return Image.open(value)
        import numpy as np

        return Image.fromarray(np.asarray(value))
    except (OSError, ValueError, TypeError) as e:
        raise MuaError(f"dataset {source}: cannot read an image ({str(e).splitlines()[0][:120]})") from None


def image_column(records: Records, text_field: str) -> str:
    """The image field: text_field where the records have it, else a column of datasets' Image type, else
    'image' / 'img'."""
    cols = records.columns
    if text_field in cols:
        return text_field
    for c in cols:
        if type(records.feature(c)).__name__ == "Image":
            return c
    for c in ("image", "img", "pixel_values"):
        if c in cols:
            return c
    raise MuaError(f"dataset {records.name} has no image field; its fields: {', '.join(cols)} (set text_field)")


# ------------------------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    base: torch.nn.Module
    task: LMTask | TextClsTask | ImageClsTask
    notes: list[str] = field(default_factory=list)


def compute_dtype(recipe: Recipe, device: str) -> torch.dtype:
    """The frozen weights' dtype: the recipe's on a GPU, float32 on the CPU."""
    return torch.bfloat16 if recipe.dtype == "bfloat16" and str(device).startswith("cuda") else torch.float32


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


def load_workload(recipe: Recipe, device: str = "cpu", on_note=None) -> Workload:
    """The base model (frozen, on the CPU) and the task's data for a recipe."""
    from .adapters import head_modules, lora_target_names

    notes: list[str] = []
    dtype = compute_dtype(recipe, device)
    if recipe.dtype == "bfloat16" and dtype == torch.float32:
        notes.append("dtype bfloat16 is for GPUs: on the CPU the model runs in float32")
    if recipe.model.startswith("embedded:"):
        base = load_base(recipe, on_note)  # the embedded default: byte-level, no tokenizer
        task: LMTask | TextClsTask | ImageClsTask = LMTask(
            load_lm_data(recipe.data, recipe.seq_len, recipe.eval_fraction, recipe.text_field)
        )
        new: list[str] = []
        if dtype != torch.float32:
            base = base.to(dtype)
    elif recipe.task == "causal-lm":
        tok = load_tokenizer(recipe.model)
        budget = 2 * recipe.steps * recipe.batch_size * (recipe.seq_len + 1)
        task = LMTask(
            load_lm_data(recipe.data, recipe.seq_len, recipe.eval_fraction, recipe.text_field, tok, max_tokens=budget)
        )
        loaded = load_hf(recipe.model, "causal-lm", dtype=dtype)
        base, new = loaded.model, loaded.new_weights
        _check_vocab(base, int(max(task.data.train.max(), task.data.eval.max())), recipe.model)
    elif recipe.task == "seq-cls":
        tok = load_tokenizer(recipe.model)
        records = _records_of(recipe.data, "seq-cls")
        labels, names = record_labels(records, recipe.label_field)
        rows, n_train = select_examples(len(records), recipe)
        ids = _tokenize_inputs(records, recipe, tok, rows)
        fixed = str(device).startswith("cuda")  # one shape for CUDA graphs; the CPU pads each batch only as needed
        task = TextClsTask(ids, [labels[i] for i in rows], names, tok.pad_token_id or 0, n_train, fixed)
        loaded = load_hf(recipe.model, "seq-cls", labels=names, dtype=dtype)
        base, new = loaded.model, loaded.new_weights
        if tok.pad_token_id is not None:
            base.config.pad_token_id = tok.pad_token_id
        _check_vocab(base, int(task.input_ids.max()), recipe.model)
    else:
        records = _records_of(recipe.data, "image-cls")
        labels, names = record_labels(records, recipe.label_field)
        column = image_column(records, recipe.text_field)
        rows, n_train = select_examples(len(records), recipe)
        loaded = load_hf(recipe.model, "image-cls", labels=names, dtype=dtype)
        base, new = loaded.model, loaded.new_weights
        cfg = base.config
        task = ImageClsTask(
            records,
            column,
            rows,
            [labels[i] for i in rows],
            names,
            n_train,
            load_image_processor(recipe.model),
            int(getattr(cfg, "image_size", 224) or 224),
            int(getattr(cfg, "num_channels", 3) or 3),
        )
    notes.append(f"data {recipe.data}: {task.describe()}")
    head = head_modules(base, recipe.task)
    if head:
        state = "new (initialized for the data's classes)" if new else "from the checkpoint"
        notes.append(
            f"head {', '.join(head)} ({state}) is not LoRA-adapted: it trains in full at the fixed head_lr "
            f"{recipe.head_lr:g} in every trial, LoRA and full finetuning alike"
        )
    if recipe.lora_ranks:
        names_ = lora_target_names(base, recipe.targets, head)
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names_})
        given = recipe.targets if isinstance(recipe.targets, str) else ",".join(recipe.targets)
        notes.append(f"LoRA targets ({given}): {len(names_)} layers, {', '.join(kinds)}")
    if recipe.per_layer_lr:
        notes.append(
            f"per-layer LR: fan-in scaling with base_n = {hidden_size(base)} (Init[B] and full finetuning "
            "base_n/n_in, Init[A] its square root)"
        )
    for n in notes:
        if on_note:
            on_note(n)
    return Workload(base=base, task=task, notes=notes)


def _check_vocab(model: torch.nn.Module, max_id: int, name: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and max_id >= emb.num_embeddings:
        raise MuaError(
            f"the tokenizer of {name} gives token id {max_id}, beyond the model's {emb.num_embeddings} "
            "embeddings: tokenizer and model do not match"
        )


def select_examples(n: int, recipe: Recipe) -> tuple[list[int], int]:
    """Record indices to use, training ones first, and how many are for training: a fixed shuffle split by
    eval_fraction; at most steps × batch_size training examples (one pass) and the held-out examples that
    evaluation reads, so a large dataset is not preprocessed whole."""
    train, held = split_indices(n, recipe.eval_fraction)
    train = train[: recipe.steps * recipe.batch_size]
    held = held[: recipe.batch_size * EVAL_MAX_BATCHES]
    return train + held, len(train)


def _tokenize_inputs(records: Records, recipe: Recipe, tok, rows: list[int]) -> list[list[int]]:
    """Token ids per record, truncated to seq_len: one text field, or two as a pair (e.g. premise,hypothesis)."""
    fields = text_fields(records, recipe.text_field)
    if len(fields) == 2:
        cols = [[_as_text(v, tok) for v in records.column(f, rows)] for f in fields]
        enc = tok(cols[0], cols[1], truncation=True, max_length=recipe.seq_len)
    else:
        enc = tok(record_texts(records, recipe.text_field, tok, rows), truncation=True, max_length=recipe.seq_len)
    ids = list(enc["input_ids"])
    if not any(ids):
        raise MuaError(f"dataset {recipe.data} is empty: no text in {recipe.text_field!r}")
    return ids


def _as_text(value, tok) -> str:
    if is_messages(value):
        return render_messages(value, tok)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def as_task(data) -> LMTask | TextClsTask | ImageClsTask:
    """A task from what a trial is given: a task, or a TokenData (the language-model path)."""
    return LMTask(data) if isinstance(data, TokenData) else data
