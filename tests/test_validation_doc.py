"""docs/validation.md quotes the scores of the second run from docs/validation_tables.md (rendered by
`python studies/report.py`): a re-render that moves a number fails here until the page follows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
RANK_RULES = {"line", "line-measured", "line-straight", "muA-pooled", "muA-last"}


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of `text`: its rows (header first), cells stripped of bold."""
    out, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                cur.append([c.strip().replace("**", "") for c in line.strip("|").split("|")])
        elif cur:
            out.append(cur)
            cur = []
    return out


def _rendered() -> dict[str, dict[str, list[str]]]:
    text = (DOCS / "validation_tables.md").read_text()
    full = text.split("## `--to full-ft`")[1].split("## `--to RANK`")[0]
    rank = text.split("## `--to RANK`")[1].split("Per workload and regime")[0]
    proxy = full.split("Proxy calibration against the winner")[1].split("Per workload")[0]
    pick = lambda t: {r[0]: r for r in _tables(t)[0][1:]}  # noqa: E731 (the first table of a part)
    return {"full": pick(full), "rank": pick(rank), "proxy": pick(proxy)}


def _num(cell: str) -> float:
    return float(re.sub(r"[×,\s]", "", cell).split("/")[0])


def test_the_second_runs_scores_are_the_rendered_ones():
    page = (DOCS / "validation.md").read_text().split("### Second run")[1].split("### Where the implementation")[0]
    got = _rendered()
    checked = 0
    for table in _tables(page)[1:]:  # the first is the workloads
        kind = "proxy" if "same ten workloads" in table[0][0] else "full"
        for row in table[1:]:
            m = re.search(r"`([^`]+)`", row[0])
            name = m.group(1) if m else ("muA-B:1 (ratio 1)" if row[0].startswith("μA's raw rule") else None)
            assert name is not None, row
            k = "rank" if name in RANK_RULES else kind
            want = got[k][name]  # rendered: rule, n, within, median, worst, covers, width[, loss]
            assert row[1] == want[2] and row[4] == want[5], (name, row, want)
            for mine, theirs in ((row[2], want[3]), (row[3], want[4]), (row[5], want[6])):
                assert _num(mine) == pytest.approx(_num(theirs), rel=0.01), (name, mine, theirs)
            checked += 1
    assert checked >= 15
