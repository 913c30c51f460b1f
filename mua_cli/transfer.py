"""Predictions from a fit: the LR at a target rank or for full finetuning, with a 95% interval and a basis.

Every prediction carries the sweep's settings and the caveat that it holds only for them (DESIGN.md §1): the
optimum moves with the optimizer, schedule, steps and batch. Reads a `FitResult` (or fit.json through
`FitResult.from_dict`), never the trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import MuaError
from .fit import FitResult, RegimeFit, few_dof_note, jsonable, pool_log2, t95
from .theory import HEURISTIC_FACTOR, HEURISTIC_REGIME, TRANSFER_REGIME, get_regime, lr_label

FULL_TARGET = "full-ft"
CAVEAT = "holds only for the same optimizer, schedule, steps and batch size as the sweep"
BASES = ("muA-slope", "free-slope", "B:1-pooled", "heuristic")


@dataclass
class Prediction:
    """One predicted learning rate. `to_dict()` is the `--json` schema."""

    lr: float
    lo: float  # 95% interval, lr units
    hi: float
    target: int | str  # a rank, or "full-ft"
    regime: str  # the regime the prediction comes from (and, for a rank, the one to train with)
    basis: str  # one of BASES
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


def _free_slope(rf: RegimeFit, x0: float) -> tuple[float, float]:
    """Centre and 95% half-width at log2 r = x0 from the free line: a prediction interval, t(n-2).

    Variance = s²(1 + 1/n + (x0 − x̄)²/Sxx) (residual scatter, the target rank's own deviation included)
    plus the per-rank widths propagated through the OLS weights; both grow with distance from the ranks.
    """
    x = np.log2(np.array(rf.ranks_used, float))
    se = np.array(rf.se_log2s)
    n, xbar = len(x), float(x.mean())
    sxx = float(((x - xbar) ** 2).sum())
    d = x0 - xbar
    var = rf.resid_se**2 * (1 + 1 / n + d**2 / sxx) + float((((1 / n) + (x - xbar) * d / sxx) ** 2 * se**2).sum())
    return rf.intercept + rf.slope * x0, t95(rf.dof) * math.sqrt(var)


def _mua_slope(rf: RegimeFit, x0: float) -> tuple[float, float]:
    """Centre and 95% half-width on μA's line, t(n-1).

    μA's exponent is taken as exact, so the interval does not grow with distance: it holds the intercept's
    uncertainty and the scatter of the measured optima about μA's line (the target rank's own deviation).
    """
    var = rf.intercept_mua_se**2 + (rf.resid_se_mua or 0.0) ** 2
    return rf.intercept_mua + rf.expected_slope * x0, t95(rf.dof_mua) * math.sqrt(var)


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


def predict_rank(fit: FitResult, regime: str, rank: int) -> Prediction:
    """The LR for `regime` at `rank`, from the regime's fit over its measured ranks.

    μA's slope when the free slope is consistent with it (or untested): a theory-backed line needs only an
    intercept, so extrapolation is tighter. The free slope when μA's exponent lies outside its interval.
    """
    reg = get_regime(regime)
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise MuaError(f"bad target rank {rank!r}: a rank is a positive integer")
    rank = int(rank)
    rf = fit.regimes.get(reg.name)
    if rf is None:
        raise MuaError(f"no trials for regime {reg.name} in this run; sweep it with --regimes {reg.name}")
    if len(rf.ranks_used) < 2:
        raise MuaError(_too_few(rf))
    x0 = math.log2(rank)
    exp = f"{rf.expected_slope:+g}"
    if rf.verdict == "inconsistent":
        lo_s, hi_s = rf.slope_interval
        centre, half = _free_slope(rf, x0)
        basis = "free-slope"
        reason = (
            f"free slope {rf.slope:+.3f} (95% {lo_s:+.3f} to {hi_s:+.3f}) excludes μA's {exp}: "
            f"the measured slope is used, not μA's"
        )
    else:
        centre, half = _mua_slope(rf, x0)
        basis = "muA-slope"
        if rf.verdict == "consistent":
            reason = "free slope consistent with μA's; μA's slope used for a tighter, theory-backed extrapolation"
        else:
            reason = (
                f"only two usable ranks: the free slope ({rf.slope:+.3f}) has no interval, so μA's {exp} "
                f"is used untested; sweep a third rank to test it"
            )
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
    notes = []
    dof = rf.dof if basis == "free-slope" else rf.dof_mua
    if note := few_dof_note(dof, "this prediction", len(rf.ranks_used)):
        notes.append(note)
    lo_r, hi_r = rf.ranks_used[0], rf.ranks_used[-1]
    if not lo_r <= rank <= hi_r:
        notes.append(f"extrapolates from the measured ranks {lo_r}–{hi_r} to rank {rank}")
    if rf.unusable:
        notes.append("not used: " + "; ".join(f"rank {u['rank']}: {u['reason']}" for u in rf.unusable))
    evidence = {
        "slope": rf.slope,
        "slope_interval": rf.slope_interval,
        "expected_slope": rf.expected_slope,
        "verdict": rf.verdict,
        "per_rank": [
            {"rank": r, "lr": 2.0**y, "se_log2": s}
            for r, y, s in zip(rf.ranks_used, rf.log2_lr_stars, rf.se_log2s, strict=True)
        ],
    }
    return Prediction(
        lr=2.0**centre,
        lo=2.0 ** (centre - half),
        hi=2.0 ** (centre + half),
        target=rank,
        regime=reg.name,
        basis=basis,
        reason=reason,
        ranks_used=list(rf.ranks_used),
        settings=settings,
        evidence=evidence,
        peft=_peft_snippet(reg.name, alpha0, rank),
        notes=notes,
    )


def _lr_text(lr: float) -> str:
    """'2^-9 (0.00195)' for a power of two; the number alone otherwise (its label would repeat it)."""
    label, number = lr_label(lr), f"{lr:.3g}"
    return number if label == number else f"{label} ({number})"


def _full_settings(fit: FitResult) -> dict:
    return {"method": "full finetuning", **_common(fit)}


def _pooled(rf: RegimeFit) -> tuple[float, float, str | None]:
    """log2 centre and 95% half-width of the regime's η* pooled over its usable ranks, and a few-dof note."""
    p = pool_log2(rf.log2_lr_stars, rf.se_log2s)
    return p.mean, p.half, few_dof_note(p.dof, f"the {rf.regime} η* pooled over ranks", len(rf.ranks_used))


def predict_full(fit: FitResult, heuristic: bool = False) -> Prediction:
    """The full-finetuning LR: μA's B:1 transfer (η_full = η*_B:1 pooled over usable ranks).

    With `heuristic=True` and no B:1 but A:r measured: "LoRA Without Regret" (Schulman et al. 2025),
    η_full ≈ η*_A:r / 10, labelled as a heuristic: μA gives no full-finetuning prediction from A:r.
    """
    b1 = fit.regimes.get(TRANSFER_REGIME)
    if b1 is None or not b1.ranks_used:
        ar = fit.regimes.get(HEURISTIC_REGIME)
        if heuristic and ar is not None and ar.ranks_used:
            return _heuristic(fit, ar)
        if b1 is None:
            msg = (
                f"no {TRANSFER_REGIME} trials in this run: sweep with --regimes {TRANSFER_REGIME} "
                f"to predict a full-finetuning learning rate"
            )
        else:
            msg = _too_few(b1, 1, "a full-finetuning prediction")
        if ar is not None and not heuristic:
            msg += " (--heuristic gives the 'LoRA Without Regret' A:r/10 rule of thumb instead; it is not μA)"
        elif heuristic and (ar is None or not ar.ranks_used):
            msg += f" (--heuristic needs a usable {HEURISTIC_REGIME} rank, and this run has none)"
        raise MuaError(msg)
    centre, half, dof_note = _pooled(b1)
    notes = [dof_note] if dof_note else []
    if len(b1.ranks_used) == 1:
        notes.append(f"one usable {TRANSFER_REGIME} rank ({b1.ranks_used[0]}): its own interval, no pooling")
    if b1.verdict == "inconsistent":
        notes.append(
            f"{TRANSFER_REGIME}'s optimum moved with rank (slope {b1.slope:+.3f}, μA expects 0): "
            f"the pooled value averages over that drift"
        )
    alpha0 = float(fit.settings.get("alpha0", 1.0))
    if alpha0 != 1.0:
        notes.append(f"μA's 1:1 transfer is stated for alpha0 = 1; this sweep used alpha0 = {alpha0:g}")
    evidence = None
    if fit.full is not None:
        evidence = {"measured_full_lr": fit.full.lr_star, "full_reason": fit.full.reason}
        c = fit.full_vs_b1
        if c is not None:
            verdict = (
                "consistent with μA's 1:1"
                if c.consistent_with_one
                else "not 1: μA's 1:1 transfer does not hold as is here"
            )
            evidence.update(
                measured_full_interval=c.full_interval,
                ratio=c.ratio,
                ratio_interval=c.ratio_interval,
                calibrated=(
                    f"this run also measured full finetuning: η*_full = {_lr_text(c.full_lr)}; "
                    f"η*_{TRANSFER_REGIME} / η*_full = {c.ratio:.2f} "
                    f"(95% {c.ratio_interval[0]:.2f}–{c.ratio_interval[1]:.2f}), {verdict}. For a model "
                    f"where only {TRANSFER_REGIME} is swept with this recipe, dividing its prediction by "
                    f"this ratio calibrates it, if the ratio is stable across widths"
                ),
            )
    return Prediction(
        lr=2.0**centre,
        lo=2.0 ** (centre - half),
        hi=2.0 ** (centre + half),
        target=FULL_TARGET,
        regime=TRANSFER_REGIME,
        basis="B:1-pooled",
        reason=(
            f"μA: {TRANSFER_REGIME} (Init[B], lora_alpha = r) shares full finetuning's width scaling, so its "
            f"rank-invariant optimum is the full-finetuning LR; pooled over ranks "
            f"{', '.join(map(str, b1.ranks_used))}"
        ),
        ranks_used=list(b1.ranks_used),
        settings=_full_settings(fit),
        evidence=evidence,
        notes=notes,
    )


def _heuristic(fit: FitResult, ar: RegimeFit) -> Prediction:
    centre, half, dof_note = _pooled(ar)
    shift = math.log2(HEURISTIC_FACTOR)
    return Prediction(
        lr=2.0 ** (centre - shift),
        lo=2.0 ** (centre - half - shift),
        hi=2.0 ** (centre + half - shift),
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
            f"factor; sweep {TRANSFER_REGIME} for μA's prediction",
            *([dof_note] if dof_note else []),
        ],
    )
