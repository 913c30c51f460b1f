"""The full-finetuning LR: measured where the run swept full finetuning; else B:1's η* read as the study's
anchor divided by a B:1 / full ratio, measured on a proxy run (`--calibrate`) or the study's (calibration.py);
μA's raw 1:1 rule and the "LoRA Without Regret" rule of thumb by name, labelled (transfer.py says how
answers are built)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MuaError
from . import calibration as cal
from .anchor import full_anchor, source_b1
from .fit import FitResult, RegimeFit, fit_regime
from .rank_optima import Z95
from .theory import HEURISTIC_FACTOR, HEURISTIC_REGIME, TRANSFER_REGIME
from .transfer import FULL_BASES, FULL_TARGET, Prediction, check_basis, common_settings, lr_interval, lr_text, too_few


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


@dataclass
class StudyRatio:
    """The study's B:1 / full ratio for this run: a constant, or the study's chosen model of it in the run's
    features (calibration.B1_OVER_FULL_MODEL). `se`: a new workload's log2 ratio about it; `t`: its quantile."""

    log2: float
    se: float
    t: float
    basis: str  # "" for the constant, else the features it was read from, e.g. "B:1's slope -0.235"

    @property
    def ratio(self) -> float:
        return 2.0**self.log2

    @property
    def interval(self) -> list[float]:
        return [2 ** (self.log2 - self.t * self.se), 2 ** (self.log2 + self.t * self.se)]


def _t(dof: float) -> float:
    from scipy import special  # where it is used: reading a saved fit needs no SciPy

    return float(special.stdtrit(dof, 0.975)) if dof >= 1 else math.inf  # t's 97.5 % quantile


def _features(fit: FitResult, b1: RegimeFit) -> dict[str, float]:
    """The run's values of the features a ratio model may use (the study's names, studies/report.py); B:1's
    slope over the ranks the study predicted from."""
    b1 = source_b1(b1, fit.optima, fit_regime)
    out = {"slope": b1.slope if b1.slope is not None else 0.0, "steps": math.log2(int(fit.settings.get("steps") or 1))}
    task = (fit.settings.get("recipe") or {}).get("task") or "causal-lm"
    for name in (cal.B1_OVER_FULL_MODEL or {}).get("columns", []):
        if name.startswith("task="):
            out[name] = float(task == name.split("=", 1)[1])
    return out


def _model_se(m: dict, v: np.ndarray) -> float:
    """A new run's log2 ratio's SE about the model at v = (1, features) (calibration.py says which interval)."""
    h = float(v @ np.array(m["cov"]) @ v)
    return math.sqrt(m["s"] ** 2 + h) if m.get("interval") == "meta" else m["s"] * math.sqrt(1 + h)


def study_ratio(fit: FitResult, b1: RegimeFit) -> StudyRatio:
    """The study's B:1 / full ratio as it applies to this run, with the spread of a new workload about it."""
    m, n = cal.B1_OVER_FULL_MODEL, cal.B1_OVER_FULL_N
    if not m:
        return StudyRatio(cal.B1_OVER_FULL_LOG2, cal.B1_OVER_FULL_SD * math.sqrt(1 + 1 / max(n, 1)), _t(n - 1), "")
    if not m["columns"]:
        return StudyRatio(m["coef"][0], _model_se(m, np.ones(1)), _t(m["dof"]), "")
    feats = _features(fit, b1)
    missing = [c for c in m["columns"] if c not in feats]
    if missing:
        raise MuaError(f"the study's ratio model needs {', '.join(missing)}, which this run does not record")
    z = np.array([feats[c] for c in m["columns"]], float)
    if m.get("mean") is not None:
        z = (z - np.array(m["mean"])) / np.array(m["sd"])
    v = np.concatenate([[1.0], z])
    log2 = float(v @ np.array(m["coef"]))
    se = _model_se(m, v)
    shown = ", ".join(
        f"B:1's measured slope over ranks ≤ {cal.FULL_SOURCE_MAX_RANK}, {feats['slope']:+.3f}"
        if c == "slope"
        else f"{int(fit.settings.get('steps'))} steps"
        if c == "steps"
        else c  # fmt: skip
        for c in m["columns"]
    )
    return StudyRatio(log2, se, _t(m["dof"]), shown)


def _full_line(fit: FitResult, b1: RegimeFit, basis: str, calibration: FitResult | None):
    """(log2 centre, log2 95 % half-width, reason, notes, evidence) of a full-ft prediction on one of FULL_BASES."""
    if basis == "muA-B:1":
        centre, se = b1.line(b1.centre_x, "mua")
        reason = (
            f"μA's raw rule: {TRANSFER_REGIME} (Init[B], lora_alpha = r) shares full finetuning's width scaling, "
            f"so its optimum, pooled over ranks {', '.join(map(str, b1.ranks_used))}, is taken as the "
            f"full-finetuning LR (labelled: the study found it too high, see docs/validation.md)"
        )
        return centre, Z95 * se, reason, [], {}
    anchor = full_anchor(b1, fit.optima, fit_regime)
    ref, ref_se, notes = anchor.log2, anchor.se, list(anchor.notes)
    at = f"{anchor.label} ({lr_text(2.0**ref)})"
    evidence = {
        "anchor": anchor.label,
        "b1_lr": 2.0**ref,
        "b1_interval": [2 ** (ref - Z95 * ref_se), 2 ** (ref + Z95 * ref_se)],
    }
    if basis == "calibrated":
        if calibration is None:
            raise MuaError("basis 'calibrated' needs --calibrate RUN: a run with B:1 and full-finetuning trials")
        c = calibration.full_vs_b1
        if c is None:
            raise MuaError(
                "the --calibrate run has no usable B:1 and full-finetuning optima to measure the ratio from; "
                f"sweep it with --regimes B:1 --ranks 4,{cal.FULL_REF_RANK},64,full"
            )
        ratio_se = math.log2(c.ratio_interval[1] / c.ratio_interval[0]) / (2 * Z95)
        half = Z95 * math.sqrt(ref_se**2 + ratio_se**2 + cal.CALIBRATE_SD**2)
        reason = (
            f"{at} divided by the B:1 / full ratio measured on the --calibrate run, {c.ratio:.3g} (95 % interval "
            f"[{c.ratio_interval[0]:.3g}, {c.ratio_interval[1]:.3g}]; its model {calibration.settings.get('model')}, "
            f"{calibration.settings.get('steps')} steps)"
        )
        evidence.update(b1_over_full=c.ratio, b1_over_full_interval=c.ratio_interval, b1_over_full_from="--calibrate")
        evidence["calibration_model"] = calibration.settings.get("model")
        notes.extend(_proxy_differences(fit, calibration))
        return ref - math.log2(c.ratio), half, reason, notes, evidence
    n, fams = cal.B1_OVER_FULL_N, cal.B1_OVER_FULL_FAMILIES
    sr = study_ratio(fit, b1)
    half = sr.t * math.sqrt(ref_se**2 + sr.se**2)
    lo, hi = sr.interval
    model = f", its model's value at {sr.basis}" if sr.basis else ""
    reason = (
        f"empirical: {at} divided by the study's B:1 / full ratio {sr.ratio:.3g}{model} (95 % interval for a new "
        f"workload [{lo:.3g}, {hi:.3g}], from {n} workloads of {fams} model families; docs/validation.md). "
        f"Measure your own with --ranks ...,full; `mua sweep --full-check` adds a cheap check"
    )
    evidence.update(b1_over_full=sr.ratio, b1_over_full_interval=[lo, hi], b1_over_full_from="study")
    return ref - sr.log2, half, reason, notes, evidence


def _proxy_differences(fit: FitResult, proxy: FitResult) -> list[str]:
    keys = ("model", "steps", "batch_size", "seq_len")
    diff = [
        f"{k} {proxy.settings.get(k)} → {fit.settings.get(k)}"
        for k in keys
        if proxy.settings.get(k) != fit.settings.get(k)
    ]
    return [f"calibration run differs in {', '.join(diff)}"] if diff else []


def predict_full(
    fit: FitResult,
    heuristic: bool = False,
    basis: str = "auto",
    calibration: FitResult | None = None,
    check: FitResult | None = None,
) -> Prediction:
    """The full-finetuning LR: measured where the run has full-finetuning trials, else predicted from B:1.

    basis: "auto" (measured, else calibrated with `calibration`, else the study's offset), "predict" (the
    same without measured), "measured", or one of FULL_BASES. `heuristic=True` with no B:1 but A:r swept:
    the "LoRA Without Regret" rule of thumb, labelled. `check`: the run's full-finetuning check (a sweep of
    full finetuning alone at fewer steps), shown beside a prediction, never in its place (docs/validation.md,
    the fourth run)."""
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
                predicted=pred.lr,
                predicted_interval=[pred.lo, pred.hi],
                predicted_basis=pred.basis,
                ratio_predicted_to_measured=pred.lr / measured.lr_star,
            )
        if fit.full_vs_b1 is not None:
            c = fit.full_vs_b1
            evidence.update(
                anchor=c.anchor_label,
                b1_lr=c.b1_lr,
                b1_interval=c.b1_interval,
                b1_over_full=c.ratio,
                b1_over_full_interval=c.ratio_interval,
                b1_over_full_from="measured",
            )
        return Prediction(
            lr=measured.lr_star,
            interval=(measured.lo, measured.hi),
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
    centre, half, reason, notes, evidence = _full_line(fit, b1, chosen, calibration)
    if fit.full is not None:
        evidence["full_reason"] = fit.full.reason
    alpha0 = float(fit.settings.get("alpha0", 1.0))
    if alpha0 != 1.0:
        notes.append(f"B:1's transfer is studied at alpha0 = 1; this sweep used alpha0 = {alpha0:g}")
    lr, lo, hi = 2.0**centre, 2.0 ** (centre - half), 2.0 ** (centre + half)
    if check is not None:
        reason += _check(check, lo, hi, evidence, notes)
    return Prediction(
        lr=lr,
        interval=(lo, hi),
        target=FULL_TARGET,
        regime=TRANSFER_REGIME,
        basis=chosen,
        reason=reason,
        ranks_used=list(b1.ranks_used),
        settings=_full_settings(fit),
        evidence=evidence,
        notes=notes,
    )


def _check(check: FitResult, lo: float, hi: float, evidence: dict, notes: list[str]) -> str:
    """What the run's full-finetuning check adds to a prediction with interval [lo, hi]: its measured optimum in
    `evidence`, a clause for the reason, and a note where it disagrees or has no optimum."""
    steps = check.settings.get("steps")
    full = check.full
    if full is None or not full.usable:
        why = full.reason if full is not None else "no full-finetuning trials"
        notes.append(f"the full-finetuning check ({steps} steps) has no usable optimum: {why}")
        return ""
    inside = lo <= full.lr_star <= hi
    evidence["full_check"] = {"lr": full.lr_star, "interval": [full.lo, full.hi], "steps": steps, "inside": inside}
    where = "inside" if inside else "outside"
    if not inside:
        notes.append(
            f"the full-finetuning check ({steps} steps) put η* at {lr_text(full.lr_star)}, outside this interval: "
            "the two disagree (in the study, the two checks that lay outside were wrong, one 39×, and the prediction "
            "was right: docs/validation.md); measure full finetuning at a few LRs around both (--ranks ...,full)"
        )
    return (f"; checked against this run's full-finetuning check ({steps} steps a trial): its η* "
            f"{lr_text(full.lr_star)} lies {where} the interval")  # fmt: skip


def _heuristic(fit: FitResult, ar: RegimeFit) -> Prediction:
    centre, se = ar.line(ar.centre_x, "mua")
    shift = math.log2(HEURISTIC_FACTOR)
    lr, lo, hi = lr_interval(centre - shift, se)
    return Prediction(
        lr=lr,
        interval=(lo, hi),
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
