"""One sweep, many workers: a planner (`mua sweep --study`) and `mua worker` processes share a study on a real
PostgreSQL server (tests/pg_server.py; CI starts one) or on the run folder's SQLite file. Each test counts what
the study holds at the end: every planned trial finished exactly once, none lost, and the fit equal to the same
sweep run by one process alone."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import TINY_TEST_RECIPE
from pg_server import pg_server  # noqa: F401
from test_bad_inputs import one_line_error
from typer.testing import CliRunner

from mua_cli.ui.cli import app

FAST_BEAT = {"MUA_HEARTBEAT_S": "1", "MUA_GRACE_S": "3"}  # a dead worker's trial goes back to the queue in ~3 s
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "micro.yaml"
    path.write_text(yaml.safe_dump({**TINY_TEST_RECIPE, "ranks": "2,8", "regimes": "B:1"}))
    return path


@pytest.fixture(scope="module")
def slow_micro(tmp_path_factory):
    """Trials long enough (several seconds) to be killed in the middle, at LRs low enough never to diverge (a
    diverged trial ends at once, and with it the worker's part)."""
    path = tmp_path_factory.mktemp("shared") / "slow.yaml"
    path.write_text(yaml.safe_dump({**TINY_TEST_RECIPE, "ranks": "2", "regimes": "B:1", "steps": 1500,
                                    "lrs": "2^-12:2^-10", "refine": 0, "max_extend": 0}))  # fmt: skip
    return path


def _mua(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from mua_cli.ui.cli import main; main()", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def _finish(procs, timeout=600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout + stderr))
    return out


def _fit(*args) -> dict:
    res = CliRunner().invoke(app, ["fit", *map(str, args), "--json", "--no-plot"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    return {name: (reg["slope"], reg["log2_lr_stars"]) for name, reg in doc["regimes"].items()}


@pytest.fixture(scope="module")
def alone(micro, tmp_path_factory, model_cache):
    """The same sweep by one `mua sweep`, no study: what every shared run must reproduce."""
    run = tmp_path_factory.mktemp("alone") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUA_CACHE", str(model_cache))
        res = CliRunner().invoke(app, ["sweep", "--recipe", str(micro), "--out", str(run), "--device", "cpu",
                                       "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return _fit(run), len(_finished(optuna.load_study(study_name="run", storage=f"sqlite:///{run}/trials.db")))


def _finished(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def _check_exactly_once(url: str, name: str, expected: int) -> None:
    study = optuna.load_study(study_name=name, storage=url)
    done = _finished(study)
    keys = [t.user_attrs["key"] for t in done]
    assert len(keys) == len(set(keys)) == expected  # no trial finished twice, none lost
    left = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))
    assert not left and study.user_attrs["mua_state"] == "done"


def test_four_workers_on_postgres_run_every_trial_once(pg_server, micro, alone, tmp_path):  # noqa: F811
    url, study = pg_server.make_database("four"), "four"
    planner = _mua("sweep", "--recipe", micro, "--storage", url, "--study", study, "--device", "cpu", "--quiet",
                   "--out", tmp_path / "four-run")  # fmt: skip
    time.sleep(2)
    workers = [
        _mua("worker", "--storage", url, "--study", study, "--device", "cpu", "--quiet", "--wait", 300)
        for _ in range(4)
    ]
    for rc, text in _finish([planner, *workers]):
        assert rc == 0, text
        assert "secret-pw" not in text  # the password never shows
    fitted, n = alone
    _check_exactly_once(url, study, n)
    assert _fit("--storage", url, "--study", study) == fitted


def test_a_killed_worker_loses_only_its_trial_which_runs_again(pg_server, slow_micro, tmp_path):  # noqa: F811
    url, name = pg_server.make_database("kill"), "kill"
    planner = _mua("sweep", "--recipe", slow_micro, "--storage", url, "--study", name, "--device", "cpu", "--quiet",
                   "--out", tmp_path / "kill-run", env=FAST_BEAT)  # fmt: skip
    victim = _mua(
        "worker", "--storage", url, "--study", name, "--device", "cpu", "--quiet", "--wait", 300, env=FAST_BEAT
    )
    held = _wait_for_trial_held_by(url, name, victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    (rc, text), = _finish([planner])  # fmt: skip
    assert rc == 0, text
    study = optuna.load_study(study_name=name, storage=url)
    by_id = {t._trial_id: t for t in study.get_trials(deepcopy=False)}  # noqa: SLF001
    assert by_id[held].state == optuna.trial.TrialState.FAIL  # stale: its heartbeat stopped
    key = by_id[held].user_attrs["key"]
    again = [t for t in _finished(study) if t.user_attrs["key"] == key]
    assert len(again) == 1 and again[0].system_attrs.get("failed_trial") == by_id[held].number
    _check_exactly_once(url, name, 3)


def test_a_worker_stopped_with_ctrl_c_hands_its_trial_back(pg_server, slow_micro, tmp_path):  # noqa: F811
    url, name = pg_server.make_database("sigint"), "sigint"
    planner = _mua("sweep", "--recipe", slow_micro, "--storage", url, "--study", name, "--device", "cpu", "--quiet",
                   "--out", tmp_path / "sigint-run")  # fmt: skip
    worker = _mua("worker", "--storage", url, "--study", name, "--device", "cpu", "--quiet", "--wait", 300)
    held = _wait_for_trial_held_by(url, name, worker.pid)
    worker.send_signal(signal.SIGINT)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 130 and "back to the queue" in err, (worker.returncode, out[-2000:], err[-2000:])
    (rc, text), = _finish([planner])  # fmt: skip
    assert rc == 0, text
    study = optuna.load_study(study_name=name, storage=url)
    released = [t for t in study.get_trials(deepcopy=False) if t._trial_id == held][0]  # noqa: SLF001
    assert released.system_attrs.get("mua_released") and released.state == optuna.trial.TrialState.FAIL
    _check_exactly_once(url, name, 3)


def test_a_database_restart_mid_sweep_loses_nothing(pg_server, micro, alone, tmp_path):  # noqa: F811
    url, name = pg_server.make_database("restart"), "restart"
    planner = _mua("sweep", "--recipe", micro, "--storage", url, "--study", name, "--device", "cpu", "--quiet",
                   "--out", tmp_path / "restart-run")  # fmt: skip
    procs = [planner, _mua("worker", "--storage", url, "--study", name, "--device", "cpu", "--quiet", "--wait", 300)]
    _wait_for_finished(url, name, 5)
    pg_server.restart()
    for rc, text in _finish(procs):
        assert rc == 0, text
    fitted, n = alone
    _check_exactly_once(url, name, n)
    assert _fit("--storage", url, "--study", name) == fitted


def test_eight_workers_on_the_sqlite_default_are_never_locked_out(micro, alone, tmp_path):
    run = tmp_path / "run"
    planner = _mua("sweep", "--recipe", micro, "--out", run, "--study", "mua8", "--device", "cpu", "--quiet")
    time.sleep(2)
    workers = [
        _mua("worker", "--out", run, "--study", "mua8", "--device", "cpu", "--quiet", "--wait", 300) for _ in range(8)
    ]
    for rc, text in _finish([planner, *workers]):
        assert rc == 0, text
        assert "locked" not in text
    fitted, n = alone
    _check_exactly_once(f"sqlite:///{run}/trials.db", "mua8", n)
    assert _fit(run) == fitted


def test_two_sweeps_of_one_folder_at_once_store_each_trial_once(micro, alone, tmp_path):
    run = tmp_path / "run"
    both = [_mua("sweep", "--recipe", micro, "--out", run, "--device", "cpu", "--quiet") for _ in range(2)]
    for rc, text in _finish(both):
        assert rc == 0, text
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{run}/trials.db")
    keys = [t.user_attrs["key"] for t in study.get_trials(deepcopy=False)]
    fitted, n = alone
    assert len(keys) == len(set(keys)) == n
    assert _fit(run) == fitted


def test_bad_credentials_and_studies_are_one_line_and_exit_2(pg_server, micro, tmp_path):  # noqa: F811
    from pg_server import url_for

    wrong = url_for(pg_server.port, password="not-the-password")
    res = CliRunner().invoke(app, ["sweep", "--recipe", str(micro), "--storage", wrong, "--study", "x",
                                   "--out", str(tmp_path / "r"), "--device", "cpu"])  # fmt: skip
    one_line_error(res, "refused the user name or password", "mua:***@127.0.0.1")
    assert "not-the-password" not in res.output
    res = CliRunner().invoke(app, ["worker", "--storage", pg_server.url, "--study", "no-such-study"])
    one_line_error(res, "no study 'no-such-study'")
    assert "secret-pw" not in res.output
    url = pg_server.make_database("old")
    optuna.create_study(study_name="old", storage=url).set_user_attr("mua_schema", 999)
    res = CliRunner().invoke(app, ["worker", "--storage", url, "--study", "old", "--device", "cpu"])
    one_line_error(res, "another version of mua")


def _wait_for_trial_held_by(url: str, name: str, pid: int, timeout: float = 180) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            study = optuna.load_study(study_name=name, storage=url)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if str(t.system_attrs.get("mua_worker", "")).endswith(f":{pid}"):
                    return t._trial_id  # noqa: SLF001
        except KeyError:
            pass  # the planner has not made the study yet
        time.sleep(0.3)
    raise AssertionError(f"process {pid} took no trial in {timeout} s")


def _wait_for_finished(url: str, name: str, n: int, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if len(_finished(optuna.load_study(study_name=name, storage=url))) >= n:
                return
        except KeyError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} trials finished in {timeout} s")
