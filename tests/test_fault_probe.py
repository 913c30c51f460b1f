"""scripts/fault_probe.py's probes, each a test: a kill inside a write, parent death with workers alive, SIGTERM,
planted symlinks, a heartbeat refused after a claim, a RUNNING trial without a heartbeat, and many processes
starting on a fresh PostgreSQL database. Each starts real `mua` processes and counts what survived."""

import importlib.util
import sys
from pathlib import Path

import pytest
from pg_server import pg_server  # noqa: F401

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fault_probe.py"
spec = importlib.util.spec_from_file_location("fault_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
sys.modules["fault_probe"] = probe
spec.loader.exec_module(probe)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(probe.SQLITE_PROBES))
def test_sqlite_fault(name, tmp_path):
    row = probe.SQLITE_PROBES[name](probe.Context(tmp_path))
    assert row.ok, row.detail


@pytest.mark.parametrize("name", list(probe.POSTGRES_PROBES))
def test_postgres_fault(name, tmp_path, pg_server):  # noqa: F811
    row = probe.POSTGRES_PROBES[name](probe.Context(tmp_path, pg_server))
    assert row.ok, row.detail
