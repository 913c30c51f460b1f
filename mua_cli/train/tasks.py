"""Per-task batches, loss and evaluation: causal LM, sequence classification, image classification
(workload.py loads each).

Every task gives the trainer the same four things: `train_batches(seed, steps, batch_size, device)` → a
function from step to batch (fixed by the seed: every LR of one seed sees the same data), `loss(model, batch)`,
`evaluate(model, batch_size, device)` → {"loss", and "accuracy" for classifiers}, and `kind`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import MuaError
from .data import TokenData
from .models import lm_loss
from .sources import Records

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
    unpadded = True  # no batch holds padding: attention needs no mask tensor (accel/attention.py)

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
    unpadded = False

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
    unpadded = True  # every image is the same number of patches

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


def as_task(data) -> LMTask | TextClsTask | ImageClsTask:
    """A task from what a trial is given: a task, or a TokenData (the language-model path)."""
    return LMTask(data) if isinstance(data, TokenData) else data
