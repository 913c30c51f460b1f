"""What a trial is (its spec) and what it gave (its result). No torch: the store and fit read these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..science.theory import FULL, get_regime, lr_label


@dataclass(frozen=True)
class TrialSpec:
    regime: str  # a regime name, or "full"
    rank: int  # 0 for full finetuning
    lr: float
    seed: int
    key: str = ""  # hash of everything that changes the outcome; set by the sweep planner

    @property
    def label(self) -> str:
        what = "full-ft" if self.regime == FULL else f"{self.regime} r={self.rank}"
        return f"{what} lr={lr_label(self.lr)} seed={self.seed}"

    def lora_settings(self, alpha0: float) -> dict:
        if self.regime == FULL:
            return {"init": "full", "alpha": None, "lora_alpha": None, "use_rslora": None}
        reg = get_regime(self.regime)
        return {"init": reg.init, "alpha": reg.alpha(alpha0, self.rank), **reg.peft_args(alpha0, self.rank)}


@dataclass
class TrialResult:
    status: str  # ok | diverged | failed
    metric: float  # the final metric; inf when diverged, nan when failed
    loss_curve: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    initial_loss: float | None = None
    wall_time: float = 0.0
    device: str = "cpu"
    error: str = ""
    info: dict = field(default_factory=dict)  # how it trained: task, LR groups (head, per-layer), eval accuracy

    def to_dict(self) -> dict:
        return asdict(self)
