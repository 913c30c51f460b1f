"""Token streams for causal LMs: byte-level (the embedded models) or tokenized, packed, split and batched
the same way for every trial of a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MuaError
from .sources import Records, open_source, read_text, record_texts, split_indices, text_fields

BYTE_VOCAB = 256


def byte_tokens(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


@dataclass
class TokenData:
    """A token stream split into a training part and a held-out tail."""

    train: torch.Tensor
    eval: torch.Tensor
    seq_len: int

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, seq_len: int, eval_fraction: float, source: str) -> TokenData:
        n_eval = int(len(tokens) * eval_fraction)
        train, held = tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval :]
        if len(train) < 4 * (seq_len + 1):
            raise MuaError(f"dataset {source} is too small: {len(train)} training tokens for windows of {seq_len + 1}")
        if eval_fraction > 0 and len(held) < seq_len + 1:
            held = train[-(seq_len + 1) * 4 :]
        return cls(train=train, eval=held, seq_len=seq_len)

    def batch_starts(self, seed: int, steps: int, batch_size: int) -> torch.Tensor:
        """Window starts for every step, fixed by the seed: every LR of one seed sees the same data."""
        g = torch.Generator().manual_seed(10_000 + seed)
        return torch.randint(0, len(self.train) - self.seq_len - 1, (steps, batch_size), generator=g)

    def windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        idx = starts[:, None] + torch.arange(self.seq_len + 1, device=starts.device)[None, :]
        return tokens[idx]

    def eval_batches(self, batch_size: int, max_batches: int = 8) -> list[torch.Tensor]:
        n = (len(self.eval) - 1) // self.seq_len
        starts = torch.arange(n) * self.seq_len
        starts = starts[: batch_size * max_batches]
        return [self.windows(self.eval, starts[i : i + batch_size]) for i in range(0, len(starts), batch_size)]


def load_text_data(spec: str, seq_len: int, eval_fraction: float) -> TokenData:
    text = read_text(spec)
    if not text.strip():
        raise MuaError(f"dataset {spec} is empty")
    return TokenData.from_tokens(byte_tokens(text), seq_len, eval_fraction, spec)


def encode_text(text: str, tokenizer=None) -> torch.Tensor:
    if tokenizer is None:
        return byte_tokens(text)
    return torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=torch.long)


def pack_documents(docs: list[str], tokenizer=None) -> torch.Tensor:
    """Documents tokenized and concatenated into one stream, each ended by EOS (a blank line for bytes)."""
    if not docs:
        return torch.zeros(0, dtype=torch.long)
    if tokenizer is None:
        return byte_tokens("\n\n".join(docs) + "\n\n")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for chunk in range(0, len(docs), 1000):
        for seq in tokenizer(docs[chunk : chunk + 1000], add_special_tokens=True)["input_ids"]:
            ids.extend(seq)
            if eos is not None and (not seq or seq[-1] != eos):
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def load_lm_data(
    spec: str,
    seq_len: int,
    eval_fraction: float,
    text_field: str = "text",
    tokenizer=None,
    max_tokens: int | None = None,
) -> TokenData:
    """Token windows for language modelling. Plain text: one stream whose tail is held out (bytes without a
    tokenizer: the embedded path, exactly `load_text_data`). Records: documents split into training and
    held-out sets (a fixed shuffle), each packed into one stream; with `max_tokens`, documents are read only
    until the training stream holds that many tokens (and the held-out one a tenth of it), so a large dataset
    is not tokenized whole."""
    source = open_source(spec)
    if source.text is not None:
        if not source.text.strip():
            raise MuaError(f"dataset {spec} is empty")
        if tokenizer is None:
            return TokenData.from_tokens(byte_tokens(source.text), seq_len, eval_fraction, spec)
        return TokenData.from_tokens(encode_text(source.text, tokenizer), seq_len, eval_fraction, spec)
    records = source.records
    if len(records) == 0:
        raise MuaError(f"dataset {spec} is empty")
    text_fields(records, text_field)  # a missing field fails here, before any work
    train_idx, eval_idx = split_indices(len(records), eval_fraction)
    train = _pack_until(records, text_field, tokenizer, train_idx, max_tokens)
    held = _pack_until(records, text_field, tokenizer, eval_idx, max_tokens and max(max_tokens // 10, 8 * seq_len))
    if len(train) == 0 and len(held) == 0:
        raise MuaError(f"dataset {spec} is empty: every {text_field!r} is blank")
    if len(train) < 4 * (seq_len + 1):
        raise MuaError(f"dataset {spec} is too small: {len(train)} training tokens for windows of {seq_len + 1}")
    if eval_fraction > 0 and len(held) < seq_len + 1:
        held = train[-(seq_len + 1) * 4 :]
    return TokenData(train=train, eval=held, seq_len=seq_len)


def _pack_until(records: Records, text_field: str, tokenizer, indices: list[int], max_tokens: int | None):
    parts, have = [], 0
    for at in range(0, len(indices), 1000):
        docs = [d for d in record_texts(records, text_field, tokenizer, indices[at : at + 1000]) if d.strip()]
        stream = pack_documents(docs, tokenizer)
        parts.append(stream)
        have += len(stream)
        if max_tokens is not None and have >= max_tokens:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------- classification: labels
