"""μA facts: regimes, their peft mapping and the optimal-LR exponents. Pure Python, no torch.

Source: Chen, Villar, Hayou, arXiv:2602.06204, and the table in docs/science.md. With α = α0 · r^(-γ),
Adam treated as sign descent gives η* ∝ (α n r)^(-1/2) for Init[A] and η* ∝ 1/(α n) for Init[B].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MuaError

FULL = "full"  # the trial kind for full finetuning; also the `--to full-ft` target
MAX_RANK = 1 << 24  # past any layer's width; the trial store's rank range


@dataclass(frozen=True)
class Regime:
    init: str  # "A" or "B"
    scaling: str  # "r", "sqrt" or "1": how α depends on rank

    @property
    def name(self) -> str:
        return f"{self.init}:{self.scaling}"

    @property
    def gamma(self) -> float:
        """α = α0 · r^(-γ)."""
        return {"r": 1.0, "sqrt": 0.5, "1": 0.0}[self.scaling]

    @property
    def rank_exponent(self) -> float:
        """μA's exponent of η* in r."""
        if self.init == "A":  # η* ∝ (α r)^(-1/2) = r^((γ-1)/2)
            return (self.gamma - 1.0) / 2.0
        return self.gamma  # Init[B]: η* ∝ 1/α = r^γ

    @property
    def width_exponent(self) -> float:
        return -0.5 if self.init == "A" else -1.0

    def alpha(self, alpha0: float, rank: int) -> float:
        """The effective multiplier α of `W0 + α B A`."""
        return alpha0 * rank ** (-self.gamma)

    def peft_args(self, alpha0: float, rank: int) -> dict:
        """peft's LoraConfig values that realise this regime's α at this rank."""
        if self.scaling == "1":
            return {"lora_alpha": alpha0 * rank, "use_rslora": False}
        return {"lora_alpha": alpha0, "use_rslora": self.scaling == "sqrt"}

    @property
    def lr_formula(self) -> str:
        return {
            "A:r": "Θ(n^-1/2)",
            "A:sqrt": "Θ(n^-1/2 r^-1/4)",
            "A:1": "Θ(n^-1/2 r^-1/2)",
            "B:r": "Θ(r / n), small r",
            "B:sqrt": "Θ(√r / n)",
            "B:1": "Θ(n^-1)",
        }[self.name]

    @property
    def transfers_to_full_ft(self) -> bool:
        """Only Init[B] with α = α0 (B:1) shares full finetuning's width scaling."""
        return self.name == TRANSFER_REGIME

    @property
    def init_text(self) -> str:
        if self.init == "A":
            return "Init[A]: A ~ N(0, 1/n_in), B = 0"
        return "Init[B]: A = 0, B ~ N(0, 1/r)"


REGIMES: dict[str, Regime] = {r.name: r for r in (Regime(i, s) for i in "AB" for s in ("r", "sqrt", "1"))}
TRANSFER_REGIME = "B:1"
HEURISTIC_REGIME = "A:r"  # "LoRA Without Regret": η_LoRA ≈ 10 × η_full with peft's usual setup
HEURISTIC_FACTOR = 10.0
FULL_FT_WIDTH_EXPONENT = -1.0


def get_regime(name: str) -> Regime:
    try:
        return REGIMES[name.strip()]
    except KeyError:
        raise MuaError(f"unknown regime {name!r}; choose from {', '.join(REGIMES)}") from None


def parse_regimes(text: str) -> list[Regime]:
    names = [t for t in (s.strip() for s in text.split(",")) if t]
    if not names:
        raise MuaError("no regime given; for example --regimes A:r,B:1")
    out = [get_regime(n) for n in names]
    return list(dict.fromkeys(out))


def parse_ranks(text: str) -> list[int | str]:
    """'4,16,64' → [4, 16, 64]; 'full' adds full-finetuning trials."""
    out: list[int | str] = []
    for tok in (t.strip() for t in str(text).split(",")):
        if not tok:
            continue
        if tok.lower() in (FULL, "full-ft"):
            out.append(FULL)
            continue
        try:
            r = int(tok)
        except ValueError:
            raise MuaError(f"bad rank {tok!r} in {text!r}: ranks are positive integers or 'full'") from None
        if r < 1:
            raise MuaError(f"bad rank {r} in {text!r}: ranks must be at least 1")
        if r > MAX_RANK:
            raise MuaError(f"bad rank {r} in {text!r}: no layer is that wide (at most {MAX_RANK})")
        out.append(r)
    if not out:
        raise MuaError(f"no rank in {text!r}; for example --ranks 4,16,64")
    return list(dict.fromkeys(out))


def parse_lrs(text: str) -> list[float]:
    """A grid of learning rates: '2^-12:2^-6' (every power of 2 between), or a list '1e-3,2e-3'."""
    text = str(text).strip()
    try:
        if ":" in text:
            lo, hi = (_parse_lr(t) for t in text.split(":", 1))
            a, b = sorted((math.log2(lo), math.log2(hi)))
            n = int(math.floor(b - a + 1e-9))
            grid = [2.0 ** (a + i) for i in range(n + 1)]
        else:
            grid = [_parse_lr(t) for t in text.split(",") if t.strip()]
    except (ValueError, OverflowError):
        raise MuaError(f"bad learning-rate grid {text!r}: use '2^-12:2^-6' or '1e-3,2e-3,4e-3'") from None
    if any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise MuaError(f"bad learning-rate grid {text!r}: learning rates must be positive")
    grid = sorted(set(grid))
    if len(grid) < 3:
        raise MuaError(f"learning-rate grid {text!r} has {len(grid)} point(s); a sweep needs at least 3")
    return grid


def _parse_lr(tok: str) -> float:
    tok = tok.strip()
    if tok.startswith("2^"):
        return 2.0 ** float(tok[2:])
    return float(tok)


def lr_label(lr: float) -> str:
    """2^-9 style label for a power of two (or a half-octave point, 2^-8.5), else the number."""
    e = math.log2(lr)
    return f"2^{e:g}" if abs(2 * e - round(2 * e)) < 1e-9 else f"{lr:.3g}"


def theory_rows() -> list[dict]:
    rows = []
    for r in REGIMES.values():
        rows.append(
            {
                "regime": r.name,
                "init": f"Init[{r.init}]",
                "alpha": {"r": "α0 / r", "sqrt": "α0 / √r", "1": "α0"}[r.scaling],
                "peft": {
                    "r": "lora_alpha = α0",
                    "sqrt": "lora_alpha = α0, use_rslora",
                    "1": "lora_alpha = α0 · r",
                }[r.scaling],
                "optimal_lr": r.lr_formula,
                "rank_exponent": r.rank_exponent,
                "width_exponent": r.width_exponent,
            }
        )
    rows.append(
        {
            "regime": "full finetuning",
            "init": "—",
            "alpha": "—",
            "peft": "—",
            "optimal_lr": "Θ(n^-1)",
            "rank_exponent": None,
            "width_exponent": FULL_FT_WIDTH_EXPONENT,
        }
    )
    return rows
