"""Answers from a fit: the LR at a target rank or for full finetuning, with a 95% interval and a basis.

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
from .fit import FitResult, RegimeFit, b1_reference, fit_regime
from .rank_optima import Z95, jsonable
from .theory import HEURISTIC_FACTOR, HEURISTIC_REGIME, TRANSFER_REGIME, get_regime, lr_label

FULL_TARGET = "full-ft"
CAVEAT = "holds only for the same optimizer, schedule, steps and batch size as the sweep"
RANK_BASES = ("shrunk-slope", "measured-slope", "muA-slope")  # predictions for a rank; "measured" besides
FULL_BASES = ("calibrated", "study-offset", "muA-B:1")  # predictions for full finetuning; "heuristic" besides
CHOICES = ("auto", "predict", "measured", *RANK_BASES, *FULL_BASES)


@dataclass
class Prediction:
    """One predicted learning rate. `to_dict()` is the `--json` schema."""

    lr: float
    lo: float  # 95% interval, lr units
    hi: float
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

    def to_dict(self) -> dict:
        return jsonable(
            {
                "lr": self.lr,
                "interval": [self.lo, self.hi],
                "target": self.target,
                "regime": self.regime,
                "basis": self.basis,
                "reason": self.reason,
                "ranks_used": self.ranks_used,
                "settings": self.settings,
                "caveat": self.caveat,
                "evidence": self.evidence,
                "peft": self.peft,
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


def _common(fit: FitResult) -> dict:
    s = fit.settings
    return {
        "model": s.get("model"),
        **_recipe_settings(fit, "task", "dtype"),
        **{k: s.get(k) for k in ("optimizer", "schedule", "steps", "batch_size", "seq_len")},
        **_recipe_settings(fit, "per_layer_lr", "head_lr"),
    }


def _too_few(rf: RegimeFit, need: int = 2, what: str = "a prediction") -> str:
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


def _interval(centre: float, se: float) -> tuple[float, float, float]:
    return 2.0**centre, 2.0 ** (centre - Z95 * se), 2.0 ** (centre + Z95 * se)


def _regime_fit(fit: FitResult, regime: str) -> RegimeFit:
    reg = get_regime(regime)
    rf = fit.regimes.get(reg.name)
    if rf is None:
        raise MuaError(f"no trials for regime {reg.name} in this run; sweep it with --regimes {reg.name}")
    return rf


def _rank_evidence(rf: RegimeFit) -> dict:
    return {
        "slope": rf.slope,
        "slope_interval": rf.slope_interval,
        "expected_slope": rf.expected_slope,
        "shrunk_slope": rf.shrunk_slope,
        "data_weight": rf.data_weight,
        "verdict": rf.verdict,
        "per_rank": [
            {"rank": r, "lr": 2.0**y, "se_log2": s}
            for r, y, s in zip(rf.ranks_used, rf.log2_lr_stars, rf.se_log2s, strict=True)
        ],
    }


def _rank_line(rf: RegimeFit, rank: int, basis: str) -> tuple[float, float, str]:
    """(log2 centre, SE, reason) of a rank prediction on one of RANK_BASES."""
    if not rf.ranks_used:
        raise MuaError(_too_few(rf, 1))
    exp = f"{rf.expected_slope:+g}"
    if basis == "measured-slope" and len(rf.ranks_used) < 2:
        raise MuaError(_too_few(rf, 2, "a measured slope"))
    centre, se = rf.line(math.log2(rank), {"shrunk-slope": "shrunk", "measured-slope": "measured"}.get(basis, "mua"))
    if basis == "muA-slope":
        reason = f"μA's exponent {exp} taken as exact, through the measured ranks (labelled: not the default)"
    elif basis == "measured-slope":
        reason = f"the measured slope {rf.slope:+.3f} alone, without μA's prior (labelled: not the default)"
    elif rf.slope is None:
        reason = f"one usable rank: μA's exponent {exp}, with the study's spread ±{rf.prior_sd:g} as its uncertainty"
    else:
        reason = (
            f"slope {rf.shrunk_slope:+.3f}: the data's {rf.line_slope:+.3f} ± {rf.slope_se:.3f} and μA's {exp} "
            f"± {rf.prior_sd:g} (the study's spread) weighed by precision, {rf.data_weight:.0%} on the data"
        )
    if basis != "muA-slope" and rf.curvature:
        reason += (
            f"; the line bends by the study's curvature for {rf.regime}, {rf.curvature:+.3f} ± {rf.curvature_sd:.3f} "
            f"per (log2 r)² (the data's slope is taken with it)"
        )
    return centre, se, reason


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
    _check_basis(basis, RANK_BASES, "a rank target")
    measured = next((o for o in fit.optima_for(reg.name) if o.rank == rank and o.usable), None)
    notes: list[str] = []
    evidence = _rank_evidence(rf)
    if basis == "measured" and measured is None:
        raise MuaError(f"this run measured no interior optimum for {reg.name} at rank {rank}")
    if measured is not None and basis in ("auto", "measured"):
        lr, lo, hi = measured.lr_star, measured.lo, measured.hi
        chosen = "measured"
        reason = f"this run swept {reg.name} at rank {rank}: its measured η* (measured beats predicted)"
        others = [r for r in rf.ranks_used if r != rank]
        if others:
            pr = _rank_line(_without(rf, rank, fit), rank, "shrunk-slope")
            evidence["predicted_without_this_rank"] = {
                "lr": 2.0 ** pr[0],
                "ratio_measured_to_predicted": measured.lr_star / 2.0 ** pr[0],
                "basis": "shrunk-slope",
            }
    else:
        chosen = "shrunk-slope" if basis in ("auto", "predict") else basis
        centre, se, reason = _rank_line(rf, rank, chosen)
        lr, lo, hi = _interval(centre, se)
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
        **_common(fit),
    }
    return Prediction(
        lr=lr,
        lo=lo,
        hi=hi,
        target=rank,
        regime=reg.name,
        basis=chosen,
        reason=reason,
        ranks_used=list(rf.ranks_used),
        settings=settings,
        evidence=evidence,
        peft=_peft_snippet(reg.name, alpha0, rank),
        notes=notes,
    )


def _without(rf: RegimeFit, rank: int, fit: FitResult) -> RegimeFit:
    """The regime's fit with one rank left out: the prediction a run without that rank would have made."""
    return fit_regime([o for o in fit.optima if not (o.regime == rf.regime and o.rank == rank)], rf.regime, rf.prior_sd)


def _check_basis(basis: str, allowed: tuple[str, ...], what: str) -> None:
    if basis not in ("auto", "predict", "measured", *allowed):
        raise MuaError(
            f"basis {basis!r} does not apply to {what}; choose from auto, predict, measured, {', '.join(allowed)}"
        )


def _peft_snippet(regime: str, alpha0: float, rank: int) -> str:
    reg = get_regime(regime)
    a = reg.peft_args(alpha0, rank)
    text = f"LoraConfig(r={rank}, lora_alpha={a['lora_alpha']:g}, use_rslora={a['use_rslora']})"
    if reg.init == "B":
        return text + (
            "  # Init[B]: after get_peft_model, zero every lora_A and draw lora_B ~ N(0, 1/r), "
            "before building the optimizer"
        )
    return text + "  # Init[A]: lora_B = 0 (peft's default); draw lora_A ~ N(0, 1/n_in) to match the sweep"


def _lr_text(lr: float) -> str:
    """'2^-9 (0.00195)' for a power of two; the number alone otherwise (its label would repeat it)."""
    label, number = lr_label(lr), f"{lr:.3g}"
    return number if label == number else f"{label} ({number})"


def _full_settings(fit: FitResult) -> dict:
    return {"method": "full finetuning", **_common(fit)}


def _need_b1(fit: FitResult, heuristic: bool) -> RegimeFit:
    b1 = fit.regimes.get(TRANSFER_REGIME)
    if b1 is not None and b1.ranks_used:
        return b1
    ar = fit.regimes.get(HEURISTIC_REGIME)
    if b1 is None:
        msg = (
            f"no {TRANSFER_REGIME} trials in this run: sweep with --regimes {TRANSFER_REGIME} "
            f"(and --ranks ...,full to measure full finetuning) to get a full-finetuning learning rate"
        )
    else:
        msg = _too_few(b1, 1, "a full-finetuning prediction")
    if ar is not None and not heuristic:
        msg += " (--heuristic gives the 'LoRA Without Regret' A:r/10 rule of thumb instead; it is not μA)"
    elif heuristic and (ar is None or not ar.ranks_used):
        msg += f" (--heuristic needs a usable {HEURISTIC_REGIME} rank, and this run has none)"
    raise MuaError(msg)


def _full_line(fit: FitResult, b1: RegimeFit, basis: str, calibration: FitResult | None):
    """(log2 centre, SE, reason, notes, evidence) of a full-finetuning prediction on one of FULL_BASES."""
    ref, ref_se = b1_reference(b1)
    at = f"{TRANSFER_REGIME}'s η* at rank {cal.FULL_REF_RANK} ({_lr_text(2.0**ref)})"
    notes, evidence = [], {"b1_at_ref_rank": 2.0**ref, "ref_rank": cal.FULL_REF_RANK}
    if basis == "muA-B:1":
        centre, se = b1.line(b1.centre_x, "mua")
        reason = (
            f"μA's raw rule: {TRANSFER_REGIME} (Init[B], lora_alpha = r) shares full finetuning's width scaling, "
            f"so its optimum, pooled over ranks {', '.join(map(str, b1.ranks_used))}, is taken as the "
            f"full-finetuning LR (labelled: the study found it too high, see docs/validation.md)"
        )
        return centre, se, reason, notes, evidence
    if basis == "calibrated":
        if calibration is None:
            raise MuaError("basis 'calibrated' needs --calibrate RUN: a run with B:1 and full-finetuning trials")
        c = calibration.full_vs_b1
        if c is None:
            raise MuaError(
                "the --calibrate run has no usable B:1 and full-finetuning optima to measure the offset from; "
                "sweep it with --regimes B:1 --ranks 4,16,64,full"
            )
        off_se = math.log2(c.ratio_interval[1] / c.ratio_interval[0]) / (2 * Z95)
        se = math.sqrt(ref_se**2 + off_se**2 + cal.CALIBRATE_SD**2)
        reason = (
            f"{at} times the offset measured on the --calibrate run (full / B:1 = {2**c.offset_log2:.3g}, "
            f"its model {calibration.settings.get('model')}, {calibration.settings.get('steps')} steps)"
        )
        evidence.update(calibration_offset_log2=c.offset_log2, calibration_model=calibration.settings.get("model"))
        notes.extend(_proxy_differences(fit, calibration))
        return ref + c.offset_log2, se, reason, notes, evidence
    se = math.sqrt(ref_se**2 + cal.FULL_OFFSET_SD**2)
    src = f"{cal.FULL_OFFSET_N} workloads" if cal.FULL_OFFSET_N else "the first held-out report, not yet the study"
    reason = (
        f"empirical: {at} times the study's full / B:1 ratio {2**cal.FULL_OFFSET_LOG2:.3g} "
        f"(spread ×{2**cal.FULL_OFFSET_SD:.2f}, from {src}; docs/validation.md). Measure your own with "
        f"--ranks ...,full, or --calibrate a cheaper proxy run"
    )
    return ref + cal.FULL_OFFSET_LOG2, se, reason, notes, evidence


def _proxy_differences(fit: FitResult, proxy: FitResult) -> list[str]:
    keys = ("model", "steps", "batch_size", "seq_len")
    diff = [
        f"{k} {proxy.settings.get(k)} → {fit.settings.get(k)}"
        for k in keys
        if proxy.settings.get(k) != fit.settings.get(k)
    ]
    return [f"calibration run differs in {', '.join(diff)}"] if diff else []


def predict_full(
    fit: FitResult, heuristic: bool = False, basis: str = "auto", calibration: FitResult | None = None
) -> Prediction:
    """The full-finetuning LR: measured where the run has full-finetuning trials, else predicted from B:1.

    basis: "auto" (measured, else calibrated with `calibration`, else the study's offset), "predict" (the
    same without measured), "measured", or one of FULL_BASES. `heuristic=True` with no B:1 but A:r swept:
    the "LoRA Without Regret" rule of thumb, labelled."""
    _check_basis(basis, FULL_BASES, "--to full-ft")
    measured = fit.full if fit.full is not None and fit.full.usable else None
    if basis == "measured" and measured is None:
        reason = fit.full.reason if fit.full is not None else "no full-finetuning trials in this run"
        raise MuaError(f"no measured full-finetuning optimum: {reason}; add them with --ranks ...,full")
    b1 = fit.regimes.get(TRANSFER_REGIME)
    has_b1 = b1 is not None and bool(b1.ranks_used)
    if measured is not None and basis in ("auto", "measured"):
        evidence = {"measured_full_lr": measured.lr_star}
        if has_b1:
            pred = predict_full(fit, basis="predict", calibration=calibration)
            evidence.update(
                predicted=pred.lr, predicted_basis=pred.basis, ratio_predicted_to_measured=pred.lr / measured.lr_star
            )
        if fit.full_vs_b1 is not None:
            evidence.update(b1_over_full=fit.full_vs_b1.ratio, b1_over_full_interval=fit.full_vs_b1.ratio_interval)
        return Prediction(
            lr=measured.lr_star,
            lo=measured.lo,
            hi=measured.hi,
            target=FULL_TARGET,
            regime="full",
            basis="measured",
            reason="this run swept full finetuning: its measured η* (measured beats predicted)",
            ranks_used=[],
            settings=_full_settings(fit),
            evidence=evidence,
        )
    if not has_b1:
        ar = fit.regimes.get(HEURISTIC_REGIME)
        if heuristic and ar is not None and ar.ranks_used:
            return _heuristic(fit, ar)
    b1 = _need_b1(fit, heuristic)
    chosen = basis if basis in FULL_BASES else ("calibrated" if calibration is not None else "study-offset")
    centre, se, reason, notes, evidence = _full_line(fit, b1, chosen, calibration)
    if fit.full is not None:
        evidence["full_reason"] = fit.full.reason
    alpha0 = float(fit.settings.get("alpha0", 1.0))
    if alpha0 != 1.0:
        notes.append(f"B:1's transfer is studied at alpha0 = 1; this sweep used alpha0 = {alpha0:g}")
    lr, lo, hi = _interval(centre, se)
    return Prediction(
        lr=lr,
        lo=lo,
        hi=hi,
        target=FULL_TARGET,
        regime=TRANSFER_REGIME,
        basis=chosen,
        reason=reason,
        ranks_used=list(b1.ranks_used),
        settings=_full_settings(fit),
        evidence=evidence,
        notes=notes,
    )


def _heuristic(fit: FitResult, ar: RegimeFit) -> Prediction:
    centre, se = ar.line(ar.centre_x, "mua")
    shift = math.log2(HEURISTIC_FACTOR)
    lr, lo, hi = _interval(centre - shift, se)
    return Prediction(
        lr=lr,
        lo=lo,
        hi=hi,
        target=FULL_TARGET,
        regime=HEURISTIC_REGIME,
        basis="heuristic",
        reason=(
            f"heuristic, not μA: the 'LoRA Without Regret' rule of thumb (Schulman et al. 2025) that with "
            f"peft's usual setup ({HEURISTIC_REGIME}) the best LoRA LR is about {HEURISTIC_FACTOR:g}× the "
            f"full-finetuning LR; η*_{HEURISTIC_REGIME} pooled over ranks "
            f"{', '.join(map(str, ar.ranks_used))}, divided by {HEURISTIC_FACTOR:g}"
        ),
        ranks_used=list(ar.ranks_used),
        settings=_full_settings(fit),
        notes=[
            f"the interval covers only the measured {HEURISTIC_REGIME} optimum, not the rule of thumb's "
            f"factor; sweep {TRANSFER_REGIME} for a calibrated prediction"
        ],
    )
