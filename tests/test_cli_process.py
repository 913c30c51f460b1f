"""The `mua` process as a user runs it: it ends without tearing its modules down (ui/cli.py `main`), yet its exit
code, its output through a pipe and its worker processes are as they would be; CPU workers fork from the
server `mua sweep` starts (sweep/pool.py) and print nothing of the libraries' own."""

from __future__ import annotations

import subprocess
import sys

import yaml
from conftest import TINY_TEST_RECIPE

from mua_cli.sweep.forkserver import SLOT_IMPORTS, process_context
from mua_cli.sweep.store import load_trials

MUA = [sys.executable, "-m", "mua_cli.ui.cli"]


def _mua(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MUA, *args], capture_output=True, text=True, timeout=600)


def test_exit_codes_and_piped_output_survive_the_fast_exit(tmp_path):
    bad = _mua("fit", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "missing" in bad.stderr
    ok = _mua("recipes")
    assert ok.returncode == 0 and "tiny" in ok.stdout  # written to a pipe, flushed before the process ended
    usage = _mua("sweep", "--no-such-flag")
    assert usage.returncode == 2 and "no-such-flag" in usage.stderr


def test_cpu_workers_fork_from_the_preloaded_server_and_stay_quiet(tmp_path):
    assert process_context("cpu").get_start_method() == "forkserver"
    assert process_context("cuda:0").get_start_method() == "spawn"  # a fork of a CUDA process cannot use CUDA
    assert SLOT_IMPORTS[0] == "mua_cli.quiet_libraries"  # before transformers reads its verbosity
    recipe, run = tmp_path / "micro.yaml", tmp_path / "run"
    few = {"ranks": "2", "lrs": "2^-8:2^-6", "refine": 0, "max_extend": 0}
    recipe.write_text(yaml.safe_dump({**TINY_TEST_RECIPE, **few}))
    res = _mua("sweep", "--recipe", str(recipe), "--out", str(run), "--device", "cpu", "--workers-per-gpu", "2")
    assert res.returncode == 0, res.stderr
    assert "this process and 1 slot process(es)" in res.stderr + res.stdout
    assert "Warning" not in res.stderr and "Loading weights" not in res.stderr, res.stderr
    trials = load_trials(run)
    assert len(trials) == 6 and set(trials["status"]) == {"ok"}
