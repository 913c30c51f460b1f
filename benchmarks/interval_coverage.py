#!/usr/bin/env python3
"""Coverage and width of fit's 95 % intervals on synthetic sweeps with a known truth (no GPU, seconds).

Per setting: 40 sweeps of B:1 with a true rank slope of −0.3 (ranks 4–256, tests/synthetic.py); the share of
per-rank η* intervals and of slope intervals that hold the truth, and their median widths (log2). Quoted in
docs/validation.md. Run: `python benchmarks/interval_coverage.py`.
"""

import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from synthetic import trials  # noqa: E402

from mua_cli.science import calibration as cal  # noqa: E402
from mua_cli.science.fit import fit_run  # noqa: E402

SETTINGS = {
    "noise 0.01, symmetric": dict(noise=0.01),
    "noise 0.01, 3x steeper above": dict(noise=0.01, asym=3),
    "noise 0.02, 2 seeds, seed shifts": dict(noise=0.02, asym=2, seeds=(0, 1), seed_shift=0.02),
    "noise 0.01, half-octave grid": dict(noise=0.01, asym=2, grid=np.arange(-40, 8) / 2),
    "noise 0.01, ranks off the power law by 0.2": dict(noise=0.01, asym=2, jitter=0.2),
    "noise 0.02, diverges 1.5 octaves above": dict(noise=0.02, asym=3, diverge_gap=1.5),
}


def main() -> None:
    cal.RANK_CURVATURE = {}  # the synthetic truth is a pure power law
    print(f"{'setting':45} {'rank cover':>10} {'width':>6} {'slope cover':>11} {'width':>6}")
    for name, kw in SETTINGS.items():
        hits, widths, s_hits, s_widths = [], [], [], []
        for rng in range(40):
            df = trials({"B:1": -0.3}, rng=rng, **kw)
            fit = fit_run(df)
            truth = df.groupby(["regime", "rank"])["x_true"].first()
            for o in fit.optima:
                if o.usable:
                    hits.append(math.log2(o.lo) <= truth[(o.regime, o.rank)] <= math.log2(o.hi))
                    widths.append(math.log2(o.hi / o.lo))
            lo, hi = fit.regimes["B:1"].slope_interval
            s_hits.append(lo <= -0.3 <= hi)
            s_widths.append(hi - lo)
        print(
            f"{name:45} {np.mean(hits):>10.2f} {np.median(widths):>6.2f} {np.mean(s_hits):>11.2f} "
            f"{np.median(s_widths):>6.2f}"
        )


if __name__ == "__main__":
    main()
