"""Answers from a fit: the LR at a target rank (here) or for full finetuning (full_ft.py), with a 95%
interval and a basis.

Measured beats predicted: when the run holds the target (trials at that rank, or full-finetuning trials with
an interior optimum), the answer is the measured η*, and the prediction stands beside it as evidence. Else:
- a rank: the regime's line through its measured ranks, with the slope shrunk toward μA's exponent by the
  study's prior width (fit.py); the interval grows with the distance of the extrapolation;
- full finetuning: B:1's η* at the reference rank plus an offset measured on a proxy run (`--calibrate`),
  or else the study's offset with its spread (calibration.py). μA's raw 1:1 rule and the measured slope
  alone stay available by name, labelled.
Every answer carries the sweep's settings and the caveat that it holds only for them: the optimum moves
with the optimizer, schedule, steps and batch.
Reads `FitResult`s (or fit.json through `FitResult.from_dict`), never the trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import MuaError
from . import calibration as cal
from .fit import FitResult, RegimeFit, fit_regime
from .rank_optima import Z95, jsonable
from .theory import get_regime, lr_label

FULL_TARGET = "full-ft"
CAVEAT = "holds only for the same optimizer, schedule, steps and batch size as the sweep"
RANK_BASES = ("shrunk-slope", "measured-slope", "muA-slope")  # predictions for a rank; "measured" besides
FULL_BASES = ("calibrated", "study-offset", "muA-B:1")  # predictions for full finetuning; "heuristic" besides
CHOICES = ("auto", "predict", "measured", *RANK_BASES, *FULL_BASES)


@dataclass
class Prediction:
    """One predicted learning rate. `to_dict()` is the `--json` schema."""

    lr: float
    interval: tuple[float, float]  # 95 % interval, lr units (the JSON's "interval")
    target: int | str  # a rank, or "full-ft"
    regime: str  # the regime the prediction comes from (and, for a rank, the one to train with)
    basis: str  # "measured", one of RANK_BASES or FULL_BASES, or "heuristic"
    reason: str  # why this basis
    ranks_used: list[int]
    settings: dict  # what the prediction holds for: adapter setup, optimizer, schedule, steps, batch
    caveat: str = CAVEAT
    evidence: dict | None = None
    peft: str | None = None  # a LoraConfig snippet for a rank target
    notes: list[str] = field(default_factory=list)
    lora_config: dict | None = None  # peft's LoraConfig(**lora_config) for a rank target, as swept

    @property
    def lo(self) -> float:
        return self.interval[0]

    @property
    def hi(self) -> float:
        return self.interval[1]

    def to_dict(self) -> dict:
        return jsonable(
            {
                "lr": self.lr,
                "interval": list(self.interval),
                "target": self.target,
                "regime": self.regime,
                "basis": self.basis,
                "reason": self.reason,
                "ranks_used": self.ranks_used,
                "settings": self.settings,
                "caveat": self.caveat,
                "evidence": self.evidence,
                "peft": self.peft,
                "lora_config": self.lora_config,
                "notes": self.notes,
            }
        )


HEAD_TASKS = ("seq-cls", "image-cls")  # tasks whose model has a classification head, trained at head_lr


def _recipe_settings(fit: FitResult, *keys: str) -> dict:
    """The recipe's values of `keys` that the sweep recorded (fit.json of older runs may lack them)."""
    rec = fit.settings.get("recipe") or {}
    out = {k: rec[k] for k in keys if k in rec}
    if out.get("head_lr") is not None and rec.get("task") not in HEAD_TASKS:
        out.pop("head_lr")  # no classification head: head_lr is unused
    return out


def common_settings(fit: FitResult) -> dict:
    s = fit.settings
    return {
        "model": s.get("model"),
        **_recipe_settings(fit, "task", "dtype"),
        **{k: s.get(k) for k in ("optimizer", "schedule", "steps", "batch_size", "seq_len")},
        **_recipe_settings(fit, "per_layer_lr", "head_lr"),
    }


def too_few(rf: RegimeFit, need: int = 2, what: str = "a prediction") -> str:
    n = len(rf.ranks_used)
    msg = f"regime {rf.regime} has {n} usable rank{'s' if n != 1 else ''}; {what} needs {need}"
    edges = [f"{u['rank']} ({u['edge']} edge)" for u in rf.unusable if u["edge"]]
    other = [f"{u['rank']} ({u['reason']})" for u in rf.unusable if not u["edge"]]
    if edges:
        msg += (
            f": the optimum sat at the grid's edge for rank {', '.join(edges)}; re-run `mua sweep` so the "
            f"grid extends past the edge, or widen --lrs"
        )
    if other:
        msg += f"{';' if edges else ':'} no optimum for rank {', '.join(other)}"
    return msg


def lr_interval(centre: float, se: float) -> tuple[float, float, float]:
    """(LR, low, high) of a log2 LR and its standard error: the 95 % interval."""
    return 2.0**centre, 2.0 ** (centre - Z95 * se), 2.0 ** (centre + Z95 * se)


def _regime_fit(fit: FitResult, regime: str) -> RegimeFit:
    reg = get_regime(regime)
    rf = fit.regimes.get(reg.name)
    if rf is None:
        raise MuaError(f"no trials for regime {reg.name} in this run; sweep it with --regimes {reg.name}")
    return rf


def _rank_evidence(rf: RegimeFit, fit: FitResult) -> dict:
    """The fit behind a rank prediction, under the names of `mua fit`'s slope table (intervals 95 %)."""
    used = rf.shrunk_slope is not None and rf.slope is not None
    cells = {o.rank: o for o in fit.optima_for(rf.regime) if o.usable}
    return {
        "slope": rf.slope,
        "slope_interval": rf.slope_interval,
        "expected_slope": rf.expected_slope,
        "curvature": rf.curvature,
        "curvature_sd": rf.curvature_sd,
        "slope_after_curvature": rf.line_slope,
        "used_slope": rf.shrunk_slope,
        "used_slope_interval": list(used_slope_interval(rf)) if used else None,
        "data_weight": rf.data_weight,
        "verdict": rf.verdict,
        "per_rank": [
            {"rank": r, "lr": cells[r].lr_star, "interval": [cells[r].lo, cells[r].hi]} for r in rf.ranks_used
        ],
    }


def _rank_line(rf: RegimeFit, rank: int, basis: str) -> tuple[float, float, str]:
    """(log2 centre, SE, reason) of a rank prediction on one of RANK_BASES."""
    if not rf.ranks_used:
        raise MuaError(too_few(rf, 1))
    exp = f"{rf.expected_slope:+g}"
    if basis == "measured-slope" and len(rf.ranks_used) < 2:
        raise MuaError(too_few(rf, 2, "a measured slope"))
    centre, se = rf.line(math.log2(rank), {"shrunk-slope": "shrunk", "measured-slope": "measured"}.get(basis, "mua"))
    if basis == "muA-slope":
        reason = f"μA's exponent {exp} taken as exact, through the measured ranks (labelled: not the default)"
    elif basis == "measured-slope":
        reason = (
            f"the measured slope after curvature {rf.line_slope:+.3f} alone, without μA's prior "
            f"(labelled: not the default)"
        )
    elif rf.slope is None:
        reason = f"one usable rank: μA's exponent {exp}, with the study's prior SD {rf.prior_sd:g} as its uncertainty"
    else:
        lo, hi = used_slope_interval(rf)
        reason = (
            f"used slope {rf.shrunk_slope:+.3f} (95 % interval [{lo:+.3f}, {hi:+.3f}]): the measured slope after "
            f"curvature, {rf.line_slope:+.3f}, shrunk toward μA's {exp} with the study's prior SD {rf.prior_sd:g}, "
            f"{rf.data_weight:.0%} weight on the data"
        )
    if basis != "muA-slope" and rf.curvature:
        reason += f"; the line bends by the study's curvature for {rf.regime}, {curvature_text(rf)}"
    extra = cal.RANK_EXTRA_SD.get(basis, 0.0)
    if extra:  # what the rule's own SE missed on the study's workloads (docs/validation.md)
        se = math.hypot(se, extra)
        reason += f"; the interval adds the study's extra spread for this rule, SD {extra:g} (log2)"
    return centre, se, reason


def default_basis(rf: RegimeFit) -> str:
    """The study's rule for a rank (calibration.RANK_BASIS); the shrunk slope where one rank gives no slope."""
    return "shrunk-slope" if cal.RANK_BASIS == "measured-slope" and len(rf.ranks_used) < 2 else cal.RANK_BASIS


def used_slope_interval(rf: RegimeFit) -> tuple[float, float]:
    """95 % interval of the slope a prediction uses (shrunk toward μA's): what `mua fit` and `transfer` quote."""
    return rf.shrunk_slope - Z95 * rf.shrunk_slope_se, rf.shrunk_slope + Z95 * rf.shrunk_slope_se


def curvature_text(rf: RegimeFit) -> str:
    """The study's rank curvature of a regime as `mua fit` and `transfer` quote it."""
    return f"{rf.curvature:+.3f} per (log2 r)² (SD {rf.curvature_sd:.3f} across the study's workloads)"


def predict_rank(fit: FitResult, regime: str, rank: int, basis: str = "auto") -> Prediction:
    """The LR for `regime` at `rank`: measured where the run has it (unless basis="predict"), else predicted.

    basis: "auto", "predict" (the default prediction even where measured), "measured", or one of RANK_BASES."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise MuaError(f"bad target rank {rank!r}: a rank is a positive integer")
    rank = int(rank)
    limit = fit.settings.get("max_lora_rank")  # recorded by the sweep; runs swept before it was are not checked
    if limit and rank > int(limit):
        raise MuaError(
            f"rank {rank} is larger than the model's adapted layers allow: at most {int(limit)}, the smaller "
            f"dimension min(n_in, n_out) of its widest adapted layer (a larger LoRA rank adds nothing)"
        )
    rf = _regime_fit(fit, regime)
    reg = get_regime(regime)
    check_basis(basis, RANK_BASES, "a rank target")
    measured = next((o for o in fit.optima_for(reg.name) if o.rank == rank and o.usable), None)
    notes: list[str] = []
    evidence = _rank_evidence(rf, fit)
    if basis == "measured" and measured is None:
        raise MuaError(f"this run measured no interior optimum for {reg.name} at rank {rank}")
    if measured is not None and basis in ("auto", "measured"):
        lr, lo, hi = measured.lr_star, measured.lo, measured.hi
        chosen = "measured"
        reason = f"this run swept {reg.name} at rank {rank}: its measured η* (measured beats predicted)"
        others = [r for r in rf.ranks_used if r != rank]
        if others:
            rest = _without(rf, rank, fit)
            pr = _rank_line(rest, rank, default_basis(rest))
            evidence["predicted_without_this_rank"] = {
                "lr": 2.0 ** pr[0],
                "ratio_measured_to_predicted": measured.lr_star / 2.0 ** pr[0],
                "basis": default_basis(rest),
            }
    else:
        chosen = default_basis(rf) if basis in ("auto", "predict") else basis
        centre, se, reason = _rank_line(rf, rank, chosen)
        lr, lo, hi = lr_interval(centre, se)
        if measured is not None:
            evidence["measured_lr"] = measured.lr_star
        lo_r, hi_r = rf.ranks_used[0], rf.ranks_used[-1]
        if not lo_r <= rank <= hi_r:
            notes.append(f"extrapolates from the measured ranks {lo_r}–{hi_r} to rank {rank}")
    if rf.unusable:
        notes.append("not used: " + "; ".join(f"rank {u['rank']}: {u['reason']}" for u in rf.unusable))
    alpha0 = float(fit.settings.get("alpha0", 1.0))
    settings = {
        "method": "LoRA",
        "rank": rank,
        "init": reg.init_text,
        **reg.peft_args(alpha0, rank),
        "alpha": reg.alpha(alpha0, rank),
        "alpha0": alpha0,
        **_recipe_settings(fit, "targets"),
        **common_settings(fit),
    }
    return Prediction(
        lr=lr,
        interval=(lo, hi),
        target=rank,
        regime=reg.name,
        basis=chosen,
        reason=reason,
        ranks_used=list(rf.ranks_used),
        settings=settings,
        evidence=evidence,
        peft=peft_snippet(config := peft_config(fit, reg.name, alpha0, rank), reg.name),
        notes=notes,
        lora_config=config,
    )


def _without(rf: RegimeFit, rank: int, fit: FitResult) -> RegimeFit:
    """The regime's fit with one rank left out: the prediction a run without that rank would have made."""
    return fit_regime([o for o in fit.optima if not (o.regime == rf.regime and o.rank == rank)], rf.regime, rf.prior_sd)


def check_basis(basis: str, allowed: tuple[str, ...], what: str) -> None:
    if basis not in ("auto", "predict", "measured", *allowed):
        raise MuaError(
            f"basis {basis!r} does not apply to {what}; choose from auto, predict, measured, {', '.join(allowed)}"
        )


PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}  # peft's task_type (image-cls has none)


def peft_config(fit: FitResult, regime: str, alpha0: float, rank: int) -> dict:
    """peft's LoraConfig arguments for `rank` in `regime`, as the sweep built them: the regime's lora_alpha and
    use_rslora, the swept targets, no dropout, no bias."""
    rec = fit.settings.get("recipe") or {}
    targets = rec.get("targets", "all-linear")
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
        targets = "all-linear" if names == ["all-linear"] else names
    out = {"r": rank, **get_regime(regime).peft_args(alpha0, rank), "target_modules": targets,
           "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    if rec.get("task") in PEFT_TASKS:
        out["task_type"] = PEFT_TASKS[rec["task"]]
    return out


def peft_snippet(config: dict, regime: str) -> str:
    """The LoraConfig to train with, and the init that goes with it (peft has no Init[B])."""
    args = ", ".join(f"{k}={v!r}" if isinstance(v, str | list) else f"{k}={v:g}" if isinstance(v, float)
                     else f"{k}={v}" for k, v in config.items())  # fmt: skip
    return (
        f"LoraConfig({args}); after get_peft_model, before the optimizer: "
        f"mua_cli.api.apply_regime(model, {regime!r})  # {get_regime(regime).init_text}"
    )


def lr_text(lr: float) -> str:
    """'2^-9 (0.00195)' for a power of two; the number alone otherwise (its label would repeat it)."""
    label, number = lr_label(lr), f"{lr:.3g}"
    return number if label == number else f"{label} ({number})"
