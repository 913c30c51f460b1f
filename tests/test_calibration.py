"""calibration.py holds what the kept study results support: studies/report.py recomputes it from them."""

import importlib.util
import sys
from pathlib import Path

import pytest

from mua_cli.science import calibration as cal

REPORT = Path(__file__).resolve().parent.parent / "studies" / "report.py"


def test_calibration_constants_match_the_study():
    spec = importlib.util.spec_from_file_location("study_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    sys.modules["study_report"] = report  # its dataclasses look their module up there
    spec.loader.exec_module(report)
    workloads = report.load_all()
    assert len(workloads) >= 6
    got = report.constants(workloads)
    for name in ("SLOPE_PRIOR_SD", "RANK_SCATTER_FLOOR", "B1_OVER_FULL_LOG2", "B1_OVER_FULL_SD"):
        assert getattr(cal, name) == pytest.approx(got[name], abs=2e-3), name
    for name in ("FULL_ANCHOR", "B1_OVER_FULL_N", "B1_OVER_FULL_FAMILIES"):
        assert getattr(cal, name) == got[name], name
    assert set(cal.RANK_CURVATURE) == set(got["RANK_CURVATURE"])
    for regime, (mean, sd) in got["RANK_CURVATURE"].items():
        assert cal.RANK_CURVATURE[regime] == pytest.approx((mean, sd), abs=2e-4), regime


@pytest.mark.slow
def test_the_shipped_rules_are_the_leave_one_family_out_winners():
    """calibration.py ships what the pre-registered selection picked (docs/validation.md, "Protocol")."""
    spec = importlib.util.spec_from_file_location("study_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    sys.modules["study_report"] = report
    spec.loader.exec_module(report)
    workloads = report.load_all()
    full, rank = report.score_full(workloads), report.score_rank(workloads)
    rule = report.full_winner(full)
    anchor, kind = rule.removesuffix(report.META).split(" ÷ ")
    assert cal.FULL_ANCHOR == anchor
    model = cal.B1_OVER_FULL_MODEL or {"kind": "const", "interval": "resid"}
    assert model["kind"] == kind or kind in ("width", "depth", "all")
    assert model.get("interval", "resid") == ("meta" if rule.endswith(report.META) else "resid")
    assert cal.RANK_BASIS == report.RANK_BASIS.get(report.rank_winner(rank))
