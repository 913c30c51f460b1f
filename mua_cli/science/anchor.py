"""Where B:1's level is read for the full-finetuning prediction (docs/validation.md, "Protocol"): a cell of
`mua fit`'s η* table, the fitted line at the reference rank, or the precision-weighted level over the ranks;
the study's candidates by name (ANCHORS), and the one mua ships (calibration.FULL_ANCHOR). No torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import calibration as cal
from .rank_optima import RankOptimum

# fit.py's RegimeFit and fit_regime: fit.py imports this module, so they come in as values, not imports
RegimeFit = Any
Refit = Callable[[list[RankOptimum], str, float], Any]

ANCHORS = ("cell16", "line16", "pooled", "cell-min", "cell-max")
ANCHOR_LABELS = {
    "cell16": f"B:1's η* at rank {cal.FULL_REF_RANK}",
    "line16": f"B:1's fitted line at rank {cal.FULL_REF_RANK}",
    "pooled": "B:1's pooled η* over its ranks",
    "cell-min": "B:1's η* at its smallest rank",
    "cell-max": "B:1's η* at its largest rank",
}


def anchor_value(b1: RegimeFit, anchor: str) -> tuple[float, float] | None:
    """(log2 η*, SE) of B:1 read as `anchor`, or None where the run lacks it (that rank has no η*)."""
    if not b1.ranks_used:
        return None
    ys, ses = b1.log2_lr_stars, b1.se_log2s
    if anchor == "line16":
        return b1.line(math.log2(cal.FULL_REF_RANK))
    if anchor == "pooled":
        w = [1 / s**2 for s in ses]
        return sum(wi * y for wi, y in zip(w, ys, strict=True)) / sum(w), math.sqrt(1 / sum(w))
    if anchor == "cell16":
        i = b1.ranks_used.index(cal.FULL_REF_RANK) if cal.FULL_REF_RANK in b1.ranks_used else None
    else:
        i = 0 if anchor == "cell-min" else len(ys) - 1
    return None if i is None else (ys[i], ses[i])


@dataclass
class Anchor:
    """B:1's η* as the full-finetuning rule reads it: log2 value, SE, how (an ANCHORS name, or the fallback
    "line<rank>"), the label `mua fit` and `transfer` both print, and a note where the fallback was taken."""

    log2: float
    se: float
    how: str
    label: str
    notes: list[str] = field(default_factory=list)


def source_b1(b1: RegimeFit, optima: list[RankOptimum], refit: Refit) -> RegimeFit:
    """B:1 over the ranks the study predicted from (≤ calibration.FULL_SOURCE_MAX_RANK): a run that swept
    higher ranks reads its anchor and slope where the study did."""
    if not b1.ranks_used or max(b1.ranks_used) <= cal.FULL_SOURCE_MAX_RANK:
        return b1
    return refit([o for o in optima if o.rank <= cal.FULL_SOURCE_MAX_RANK], b1.regime, b1.prior_sd)


def full_anchor(b1: RegimeFit, optima: list[RankOptimum], refit: Refit) -> Anchor | None:
    """B:1's η* read as the study's anchor (calibration.FULL_ANCHOR) over the study's source ranks. A cell
    anchor names its rank (the study's sweeps all had it): where the run lacks that cell, the fitted line at
    that rank stands in, said in a note."""
    src = source_b1(b1, optima, refit)
    if not src.ranks_used:
        return None
    how = cal.FULL_ANCHOR
    rank = {"cell16": cal.FULL_REF_RANK, "cell-max": cal.FULL_SOURCE_MAX_RANK}.get(how)
    if rank is None:
        c, se = anchor_value(src, how)
        return Anchor(c, se, how, ANCHOR_LABELS[how])
    if rank in src.ranks_used:
        i = src.ranks_used.index(rank)
        return Anchor(src.log2_lr_stars[i], src.se_log2s[i], how, f"B:1's η* at rank {rank}")
    c, se = src.line(math.log2(rank))
    note = (
        f"B:1 has no η* at rank {rank} in this run (the rank the study's rule reads): its fitted line at rank "
        f"{rank} stands in, which the study did not score (docs/validation.md)"
    )
    return Anchor(c, se, f"line{rank}", f"B:1's fitted line at rank {rank}", [note])
