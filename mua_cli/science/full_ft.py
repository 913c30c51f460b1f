"""The full-finetuning LR: measured where the run swept full finetuning; else B:1's η* at the reference rank
times an offset, measured on a proxy run (`--calibrate`) or the study's (calibration.py); μA's raw 1:1 rule
and the "LoRA Without Regret" rule of thumb by name, labelled (transfer.py says how answers are built)."""

from __future__ import annotations

import math

from ..errors import MuaError
from . import calibration as cal
from .fit import FitResult, RegimeFit, b1_reference
from .rank_optima import Z95
from .theory import HEURISTIC_FACTOR, HEURISTIC_REGIME, TRANSFER_REGIME
from .transfer import FULL_BASES, FULL_TARGET, Prediction, check_basis, common_settings, lr_interval, lr_text, too_few

# Where B:1's level is read for the full-finetuning prediction (docs/validation.md, "Protocol"): a cell of
# `mua fit`'s η* table, the fitted line at the reference rank, or the precision-weighted level over the ranks.
ANCHORS = ("cell16", "line16", "pooled", "cell-min", "cell-max")
ANCHOR_LABELS = {
    "cell16": f"{TRANSFER_REGIME}'s η* at rank {cal.FULL_REF_RANK}",
    "line16": f"{TRANSFER_REGIME}'s fitted line at rank {cal.FULL_REF_RANK}",
    "pooled": f"{TRANSFER_REGIME}'s pooled η* over its ranks",
    "cell-min": f"{TRANSFER_REGIME}'s η* at its smallest rank",
    "cell-max": f"{TRANSFER_REGIME}'s η* at its largest rank",
}


def anchor_value(b1: RegimeFit, anchor: str) -> tuple[float, float] | None:
    """(log2 η*, SE) of B:1 read as `anchor`, or None where the run lacks it (that rank has no η*)."""
    if not b1.ranks_used:
        return None
    ys, ses = b1.log2_lr_stars, b1.se_log2s
    if anchor == "line16":
        return b1_reference(b1)
    if anchor == "pooled":
        w = [1 / s**2 for s in ses]
        return sum(wi * y for wi, y in zip(w, ys, strict=True)) / sum(w), math.sqrt(1 / sum(w))
    if anchor == "cell16":
        i = b1.ranks_used.index(cal.FULL_REF_RANK) if cal.FULL_REF_RANK in b1.ranks_used else None
    else:
        i = 0 if anchor == "cell-min" else len(ys) - 1
    return None if i is None else (ys[i], ses[i])


def _full_settings(fit: FitResult) -> dict:
    return {"method": "full finetuning", **common_settings(fit)}


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
        msg = too_few(b1, 1, "a full-finetuning prediction")
    if ar is not None and not heuristic:
        msg += " (--heuristic gives the 'LoRA Without Regret' A:r/10 rule of thumb instead; it is not μA)"
    elif heuristic and (ar is None or not ar.ranks_used):
        msg += f" (--heuristic needs a usable {HEURISTIC_REGIME} rank, and this run has none)"
    raise MuaError(msg)


def _full_line(fit: FitResult, b1: RegimeFit, basis: str, calibration: FitResult | None):
    """(log2 centre, SE, reason, notes, evidence) of a full-finetuning prediction on one of FULL_BASES."""
    ref, ref_se = b1_reference(b1)
    at = f"{TRANSFER_REGIME}'s η* at rank {cal.FULL_REF_RANK} ({lr_text(2.0**ref)})"
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
    check_basis(basis, FULL_BASES, "--to full-ft")
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
    lr, lo, hi = lr_interval(centre, se)
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
    lr, lo, hi = lr_interval(centre - shift, se)
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
