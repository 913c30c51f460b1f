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
from mua_cli.science.fit import fit_run
from mua_cli.science.full_ft import predict_full
from mua_cli.science.transfer import predict_rank
from mua_cli.ui.report import fit_tables, prediction_panel

RUN = Path(__file__).resolve().parent.parent / "studies" / "results" / "w512"
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def stored(with_full: bool) -> pd.DataFrame:
    df = pd.read_csv(RUN / "trials.csv")
    df["recipe"] = [yaml.safe_load((RUN / "recipe.yaml").read_text())] * len(df)
    keep = df["regime"].isin(["A:r", "B:1"]) & df["rank"].isin([4, 16, 64])
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


@pytest.mark.parametrize("with_full", [False, True])
@pytest.mark.parametrize("target", ["full-ft", 256])
def test_every_number_transfer_quotes_is_in_the_fit_tables(with_full, target):
    fit = fit_run(stored(with_full))
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
    assert "B:1's η* at rank 16" in shown and "B:1's η* at rank 16" in quoted
