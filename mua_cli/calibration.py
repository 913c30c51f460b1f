"""What the transfer study measured, as the defaults `fit` and `transfer` use. Pure Python, no torch.

Each value comes from `python studies/report.py`, which reads the kept study results (studies/results/) and
prints these lines; docs/validation.md shows the tables behind them. Re-running the study on other
workloads may move them: they are evidence, not theory.
"""

from __future__ import annotations

# Spread (log2 η* per log2 r) of the measured rank exponents about μA's across the study's regimes and
# workloads: the prior width with which `fit` shrinks a measured slope toward μA's exponent.
SLOPE_PRIOR_SD = 0.25
# Scatter (log2) of one rank's η* about its regime's power law, beyond the per-rank standard error: the
# floor under the fitted scatter τ, which three or four ranks cannot estimate on their own.
RANK_SCATTER_FLOOR = 0.15
# Full finetuning without full-finetuning trials: log2(η*_full) = log2(η*_B:1 at FULL_REF_RANK) + offset,
# with the offset's spread across workloads (log2) added to the interval.
FULL_REF_RANK = 16
FULL_OFFSET_LOG2 = -1.5
FULL_OFFSET_SD = 0.5
FULL_OFFSET_N = 0  # workloads behind the offset; 0 means the value is the first report, not the study
CALIBRATE_SD = 0.3  # extra spread (log2) when an offset measured on a proxy run is carried to the target run
