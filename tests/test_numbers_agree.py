"""One set of numbers: every number `mua transfer` quotes as its basis appears in `mua fit`'s tables, in the
same formatting, on a stored study run (issue 27.3)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

from mua_cli.science import calibration as cal
from mua_cli.science.anchor import ANCHOR_LABELS
from mua_cli.science.fit import fit_run
from mua_cli.science.full_ft import predict_full
from mua_cli.science.transfer import predict_rank
from mua_cli.ui.report import fit_tables, prediction_panel

RUN = Path(__file__).resolve().parent.parent / "studies" / "results" / "w512"
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def stored(with_full: bool, ranks=(4, 16, 64)) -> pd.DataFrame:
    df = pd.read_csv(RUN / "trials.csv")
    df["recipe"] = [yaml.safe_load((RUN / "recipe.yaml").read_text())] * len(df)
    keep = df["regime"].isin(["A:r", "B:1"]) & df["rank"].isin(ranks)
    return df[keep | ((df["regime"] == "full") & with_full)]


def text(*renderables) -> str:
    con = Console(record=True, width=400, color_system=None)
    for r in renderables:
        con.print(r)
    return con.export_text()


def basis_lines(panel_text: str, answer: bool) -> str:
    """The lines of a transfer panel that quote where its number comes from (and the answer, where `mua fit`
    shows it too: full finetuning), not the settings."""
    words = ("basis:", "evidence:") + (("learning rate for",) if answer else ())
    keep = [ln for ln in panel_text.splitlines() if any(w in ln for w in words)]
    return re.sub(r"\s*│\s*", " ", "\n".join(keep))


@pytest.mark.parametrize("ranks", [(4, 16, 64), (4, 16, 64, 256)])
@pytest.mark.parametrize("with_full", [False, True])
@pytest.mark.parametrize("target", ["full-ft", 1024])
def test_every_number_transfer_quotes_is_in_the_fit_tables(with_full, target, ranks):
    fit = fit_run(stored(with_full, ranks))
    shown = text(*fit_tables(fit))
    if target == "full-ft":
        pred = predict_full(fit)
        assert pred.basis == ("measured" if with_full else "study-offset")
    else:
        pred = predict_rank(fit, "B:1", target)
        assert pred.basis == cal.RANK_BASIS
    quoted = basis_lines(text(prediction_panel(pred)), answer=target == "full-ft")
    numbers = [n for n in NUMBER.findall(quoted) if n not in {"1", "2", "95"}]  # "B:1", "(log2 r)²", "95 %"
    assert numbers, quoted
    missing = [n for n in numbers if n not in shown]
    assert not missing, f"{missing} quoted by transfer but not in mua fit's tables:\n{quoted}"


def test_the_ratio_has_one_direction_and_the_anchor_one_name():
    fit = fit_run(stored(True))
    shown, quoted = text(*fit_tables(fit)), text(prediction_panel(predict_full(fit, basis="predict")))
    for t in (shown, quoted):
        assert "B:1 / full" in t and "full / B:1" not in t
        assert "±" not in t  # uncertainty is shown one way: 95 % intervals
    label = fit.full_vs_b1.anchor_label  # a cell of the η* table by its rank, or the fitted line, named so
    assert label == ANCHOR_LABELS.get(cal.FULL_ANCHOR, f"B:1's η* at rank {cal.FULL_SOURCE_MAX_RANK}")
    assert label in shown and label in quoted
    assert f"{fit.full_vs_b1.b1_lr:.3g}" in shown and f"{fit.full_vs_b1.b1_lr:.3g}" in quoted


def test_the_ratio_model_reads_b1s_slope_over_the_studys_source_ranks():
    """A run that swept rank 256 gets the same study ratio as without it: the study read B:1's slope over ≤ 64."""
    from mua_cli.science.full_ft import study_ratio

    wide, narrow = fit_run(stored(False, (4, 16, 64, 256))), fit_run(stored(False, (4, 16, 64)))
    a, b = study_ratio(wide, wide.regimes["B:1"]), study_ratio(narrow, narrow.regimes["B:1"])
    assert a.log2 == pytest.approx(b.log2, abs=0.01)  # the noise is pooled over the ranks swept: not identical
    if cal.B1_OVER_FULL_MODEL and "slope" in cal.B1_OVER_FULL_MODEL["columns"]:
        shown = float(a.basis.split("≤ 64, ")[1].split(",")[0])
        assert shown == pytest.approx(narrow.regimes["B:1"].slope, abs=0.002)
        assert shown != pytest.approx(wide.regimes["B:1"].slope, abs=0.02)  # not the slope over ranks 4–256
