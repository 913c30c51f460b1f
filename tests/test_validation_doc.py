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


def _rendered() -> dict[str, dict[str, dict[str, str]]]:
    """The rendered tables' rows by rule, each a mapping of column name to cell."""
    text = (DOCS / "validation_tables.md").read_text()
    full = text.split("## `--to full-ft`")[1].split("## `--to RANK`")[0]
    rank = text.split("## `--to RANK`")[1].split("Per workload and regime")[0]
    proxy = full.split("Proxy calibration against the winner")[1].split("Per workload")[0]

    def pick(part: str) -> dict[str, dict[str, str]]:
        head, *rows = _tables(part)[0]  # the first table of a part
        return {r[0]: dict(zip(head, r, strict=True)) for r in rows}

    return {"full": pick(full), "rank": pick(rank), "proxy": pick(proxy)}


def _num(cell: str) -> float:
    return float(re.sub(r"[×,\s]", "", cell).split("/")[0])


# the page's column names → the rendered ones
COLUMNS = {"within √2": "within √2", "median error": "median error (×)", "worst": "worst (×)",
           "95 % covers": "95 % covers", "covers, raw": "covers, raw", "median width": "median width (×)"}  # fmt: skip


def _check_run(section: str) -> int:
    page = (DOCS / "validation.md").read_text().split(section)[1].split("\n### ")[0]
    got = _rendered()
    checked = 0
    for table in _tables(page):
        head = table[0]
        if head[0] not in ("rule", "rule (same ten workloads)"):
            continue  # the workloads' table
        kind = "proxy" if "same ten workloads" in head[0] else "full"
        for row in table[1:]:
            m = re.search(r"`([^`]+)`", row[0])
            name = m.group(1) if m else ("muA-B:1 (ratio 1)" if row[0].startswith("μA's raw rule") else None)
            assert name is not None, row
            want = got["rank" if name in RANK_RULES else kind][name]
            for col, mine in zip(head[1:], row[1:], strict=True):
                theirs = want[COLUMNS[col]] if col in COLUMNS else None
                if theirs is None:
                    continue
                if "/" in mine:
                    assert mine == theirs, (name, col, mine, theirs)
                else:
                    assert _num(mine) == pytest.approx(_num(theirs), rel=0.01), (name, col, mine, theirs)
            checked += 1
    return checked


def test_the_second_runs_scores_are_the_rendered_ones():
    assert _check_run("### Second run") >= 15


def test_the_third_runs_scores_are_the_rendered_ones():
    assert _check_run("### Third run") >= 5


def test_the_readme_quotes_the_studys_bullets_as_written():
    """README's "What the study found" carries docs/validation.md's bullets "For the README" word for word."""
    page = (DOCS / "validation.md").read_text().split('### For the README ("What the study found")')[1]
    bullets = [b.strip() for b in page.split("\n## ")[0].strip().split("\n- ") if b.strip()]
    readme = " ".join((DOCS.parent / "README.md").read_text().split("## What the study found")[1].split())
    assert len(bullets) >= 4
    for b in bullets:
        assert " ".join(b.removeprefix("- ").split()) in readme, b[:60]
