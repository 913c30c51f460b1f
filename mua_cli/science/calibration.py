"""What the transfer study measured, as the defaults `fit` and `transfer` use. Pure Python, no torch.

Every value is printed by `python studies/report.py`, which fits the kept study results (studies/results/)
with this package and scores each rule leaving one model family out; docs/validation.md shows the tables
behind them, and tests/test_calibration.py checks that these lines still match the report.
Other workloads may move them: they are evidence, not theory.
"""

from __future__ import annotations

# Root-mean-square distance of the measured rank exponents from μA's, over every regime and workload of the
# study: the prior width with which `fit` shrinks a measured slope toward μA's exponent.
SLOPE_PRIOR_SD = 0.384
# Scatter (log2) of one rank's η* about its regime's curve beyond the per-rank standard errors; the study
# found none beyond them, so this is a floor that keeps a perfect-looking fit from claiming zero scatter.
RANK_SCATTER_FLOOR = 0.05
# Full finetuning without full-finetuning trials (the rule docs/validation.md chose, leave one family out):
# η*_full = η*_B:1 read as FULL_ANCHOR (anchor.ANCHORS: "line16" is B:1's fitted line at rank FULL_REF_RANK,
# which `mua fit`'s table shows under that name) divided by the study's B:1 / full ratio. B1_OVER_FULL_LOG2 and
# B1_OVER_FULL_SD are the plain mean and spread of log2 ratio over B1_OVER_FULL_N workloads of
# B1_OVER_FULL_FAMILIES families (each family weighted once), shown for reference.
FULL_REF_RANK = 16
FULL_SOURCE_MAX_RANK = 64  # the study predicted from B:1's ranks ≤ 64 (a user's --ranks 4,16,64)
FULL_ANCHOR = "line16"
B1_OVER_FULL_LOG2 = 1.651
B1_OVER_FULL_SD = 0.312
B1_OVER_FULL_N = 12
B1_OVER_FULL_FAMILIES = 7
# The ratio a prediction uses: its columns (the study's feature names; none for a constant), coefficients
# (intercept first), degrees of freedom, and for a ridge model the features' standardization. Its interval:
# "resid": a new run's log2 ratio has SE s·√(1 + v'·cov·v) about the model; "meta" (a random-effects fit that
# counts each study workload's own noise once): s is τ, the spread of the true ratio between workloads, cov is
# the coefficients' covariance, and the SE is √(τ² + v'·cov·v). None: the constant above, "resid".
B1_OVER_FULL_MODEL: dict | None = {
    "kind": "const",
    "interval": "meta",
    "columns": [],
    "coef": [1.61674],
    "cov": [[0.04054]],
    "s": 0.0024,
    "dof": 11.0,
    "mean": None,
    "sd": None,
}
# Extra spread (log2) when an offset measured on a proxy run (`--calibrate`) is carried to the target run:
# the study's two proxy pairs (fewer steps; half the width) carried theirs within 0.15; this is kept wider.
CALIBRATE_SD = 0.3
# Curvature of log2 η* in log2 r per regime (mean, spread across workloads), the coefficient of (log2 r)²:
# Init[B] optima fall faster at high rank than a power law through ranks 4–64 says; Init[A] ones barely bend.
RANK_CURVATURE: dict[str, tuple[float, float]] = {
    "B:1": (-0.0465, 0.0266),
    "A:r": (0.0062, 0.0314),
    "A:sqrt": (-0.0171, 0.024),
    "A:1": (-0.0018, 0.0156),
    "B:r": (-0.0295, 0.02),
    "B:sqrt": (-0.0462, 0.0094),
}
# `--to RANK` without that rank measured: the rule the study chose (transfer.RANK_BASES), and per rule the log2
# spread its own standard error missed on the study's workloads (added to the interval in quadrature).
RANK_BASIS = "shrunk-slope"
RANK_EXTRA_SD: dict[str, float] = {"shrunk-slope": 0.0, "measured-slope": 0.0, "muA-slope": 1.13}
