"""The fit's picture: loss against LR (one curve per rank, a panel per regime) and η* against rank."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_file  # noqa: E402
from ..science.fit import FitResult  # noqa: E402
from ..science.rank_optima import RankOptimum  # noqa: E402


def _legend(ax) -> None:
    """A legend where the panel has labelled artists; an empty panel gets none (and no matplotlib warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _loss_panel(ax, title: str, optima: list[RankOptimum]) -> None:
    cmap = plt.get_cmap("viridis")
    for i, o in enumerate(sorted(optima, key=lambda o: o.rank)):
        pts = [(p["lr"], p["mean_metric"]) for p in o.points if p.get("mean_metric") is not None]
        if not pts:
            continue
        color = cmap(i / max(1, len(optima) - 1))
        label = "full FT" if o.regime == "full" else f"r={o.rank}"
        ax.plot(*zip(*pts, strict=True), "o-", color=color, label=label, ms=3)
        if o.lr_star:
            ax.axvline(o.lr_star, color=color, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final loss")
    ax.set_title(title)
    _legend(ax)


def plot_fit(fit: FitResult, path: Path) -> Path:
    regimes = sorted(fit.regimes)
    n = len(regimes)
    fig, axes = plt.subplots(2, max(1, n), figsize=(4.5 * max(1, n), 7.5), squeeze=False)
    for j, name in enumerate(regimes):
        ops = [o for o in fit.optima if o.regime == name]
        top = axes[0][j]
        _loss_panel(top, f"{name}: loss vs LR", ops)
        if name == "B:1" and fit.full is not None:
            pts = [(p["lr"], p["mean_metric"]) for p in fit.full.points if p.get("mean_metric") is not None]
            if pts:
                top.plot(*zip(*pts, strict=True), "s--", color="red", label="full FT", ms=3)
                _legend(top)
        ax = axes[1][j]
        rf = fit.regimes[name]
        used = [o for o in ops if o.lr_star]
        if used:
            r = np.array([o.rank for o in used], float)
            y = np.array([o.lr_star for o in used])
            err = np.array([[o.lr_star - o.lo, o.hi - o.lr_star] for o in used]).T
            ax.errorbar(r, y, yerr=err, fmt="o", color="black", capsize=3, label="η* (95 % interval)")
            grid = np.geomspace(r.min() / 2, r.max() * 4, 50)
            if rf.shrunk_slope is not None and rf.centre_x is not None:
                line = [rf.line(float(x))[0] for x in np.log2(grid)]  # with the study's curvature, if any
                ax.plot(grid, np.exp2(line), "-", label=f"used: slope {rf.shrunk_slope:+.2f}")
            if rf.intercept_mua is not None:
                ax.plot(
                    grid,
                    2 ** (rf.intercept_mua + rf.expected_slope * np.log2(grid)),
                    "--",
                    label=f"μA: slope {rf.expected_slope:+.2f}",
                )
            if name == "B:1" and fit.full is not None and fit.full.lr_star:
                ax.axhline(fit.full.lr_star, color="red", ls=":", label="full FT η*")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_ylabel("η*")
        ax.set_title(f"{name}: η* vs rank")
        if not used:
            ax.text(0.5, 0.5, "no rank has an interior η*", ha="center", va="center", transform=ax.transAxes)
        _legend(ax)
    fig.tight_layout()
    path = Path(path)
    try:  # whole or not at all: a full disk leaves the last picture, not half of a new one
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
