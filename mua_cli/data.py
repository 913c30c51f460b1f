"""Training data: the embedded corpora, local text files; tokenizing; deterministic batches."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MuaError

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
EMBEDDED_CORPORA = {
    "shakespeare": "shakespeare_plays.txt.gz",  # corpus A: pretraining the embedded default
    "britannica": "britannica_1911.txt.gz",  # corpus B: finetuning
}
BYTE_VOCAB = 256


def read_text(spec: str) -> str:
    """Text of an embedded corpus (`embedded:NAME`) or a local text file."""
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED_CORPORA:
            raise MuaError(f"no embedded corpus {name!r}; choose from {', '.join(EMBEDDED_CORPORA)}")
        with gzip.open(CORPORA_DIR / EMBEDDED_CORPORA[name], "rt", encoding="utf-8") as f:
            return f.read()
    p = Path(spec)
    if not p.is_file():
        raise MuaError(f"data file {spec} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MuaError(f"data file {spec} is not UTF-8 text") from None


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
            raise MuaError(
                f"dataset {source} is too small: {len(train)} training tokens for windows of {seq_len + 1}"
            )
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
