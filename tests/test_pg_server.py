"""Optuna's RDBStorage against a real PostgreSQL server (tests/pg_server.py, scripts/postgres.sh): a trial stored
and read back, a wrong password, a server restart under an open storage, enqueued trials shared by processes (and
the same on SQLite), and a killed trial failed by the heartbeat and retried with its parameters."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import warnings

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from pg_server import pg_server, url_for  # noqa: F401  (the fixture)

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPAWN = mp.get_context("spawn")


def test_trial_stored_and_read_back(pg_server):  # noqa: F811
    url = pg_server.make_database("roundtrip")
    study = optuna.create_study(storage=optuna.storages.RDBStorage(url), study_name="s")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-5, 1.0, log=True)},
            value=0.5,
            user_attrs={"key": "abc"},
        )
    )
    (trial,) = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url)).get_trials()
    assert (trial.state, trial.params, trial.value, trial.user_attrs) == (
        TrialState.COMPLETE,
        {"lr": 0.01},
        0.5,
        {"key": "abc"},
    )


def test_wrong_password_is_refused(pg_server):  # noqa: F811
    with pytest.raises(sqlalchemy.exc.OperationalError) as e:
        optuna.storages.RDBStorage(url_for(pg_server.port, password="wrong"))
    assert 'password authentication failed for user "mua"' in str(e.value)


def test_storage_survives_restart(pg_server):  # noqa: F811
    """With pool_pre_ping a storage opened before a restart works at once after it. Without, the first call after
    the restart fails (the pool's connection was cut: AdminShutdown); SQLAlchemy then drops the pool and the next
    call works."""
    url = pg_server.make_database("restart")
    pinged = optuna.create_study(
        storage=optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}), study_name="pinged"
    )
    plain = optuna.create_study(storage=optuna.storages.RDBStorage(url), study_name="plain")
    asked = pinged.ask()
    asked.suggest_float("x", 0, 1)
    plain.ask()

    pg_server.restart()

    pinged.tell(asked, 1.0)  # a trial asked before the restart is told after it
    assert [t.state for t in pinged.get_trials()] == [TrialState.COMPLETE]
    try:
        plain.get_trials()
    except optuna.exceptions.StorageInternalError as e:
        assert "terminating connection due to administrator command" in str(e.__cause__)
    assert [t.state for t in plain.get_trials()] == [TrialState.RUNNING]


def sqlite_serialized(storage: optuna.storages.RDBStorage) -> None:
    """Real transactions on an SQLite storage: BEGIN IMMEDIATE at SQLAlchemy's begin (Python's sqlite3 otherwise
    reads outside any transaction, so two processes can pop the same enqueued trial)."""

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # the connection RDBStorage opened to create its tables predates the listeners


def queue_worker(url: str, serialize: bool, barrier, results) -> None:
    """ask/tell until the queue is empty; puts the numbers of the enqueued trials it ran (or a traceback)."""
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if serialize else None
        )
        if serialize:
            sqlite_serialized(storage)
        study = optuna.load_study(study_name="queue", storage=storage)
        barrier.wait(timeout=120)
        ran = []
        while True:
            trial = study.ask()
            if "fixed_params" not in study._storage.get_trial_system_attrs(trial._trial_id):
                study.tell(trial, state=TrialState.FAIL)  # the queue is empty: ask made a new trial
                break
            study.tell(trial, trial.suggest_float("x", 0, 1000))
            ran.append(trial.number)
        results.put(ran)
    except BaseException:
        results.put(traceback.format_exc())


def run_queue(url: str, processes: int, trials: int, serialize: bool = False) -> None:
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="queue")
    for i in range(trials):
        study.enqueue_trial({"x": float(i)})
    barrier, results = SPAWN.Barrier(processes), SPAWN.Queue()
    procs = [SPAWN.Process(target=queue_worker, args=(url, serialize, barrier, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        ran = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [r for r in ran if isinstance(r, str)]
    assert not errors, errors[0]
    numbers = sorted(n for r in ran for n in r)
    assert numbers == list(range(trials)), "an enqueued trial ran twice or never"
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["x"] for t in done) == [float(i) for i in range(trials)]
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


def test_enqueued_trials_run_once_postgres(pg_server):  # noqa: F811
    run_queue(pg_server.make_database("queue"), processes=4, trials=60)


def test_enqueued_trials_run_once_sqlite_serialized(tmp_path):
    run_queue(f"sqlite:///{tmp_path / 'trials.db'}", processes=8, trials=40, serialize=True)


def heartbeat_storage(url: str) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=1,
            grace_period=2,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )


def hanging_worker(url: str, mode: str, ready) -> None:
    """Runs one trial that never ends: through optimize (heartbeat thread), ask alone (no heartbeat) or ask with
    a thread that records the heartbeat itself."""
    warnings.simplefilter("ignore")
    storage = heartbeat_storage(url)
    study = optuna.load_study(study_name="beat", storage=storage)

    def objective(trial):
        trial.suggest_float("x", 0, 100)
        ready.set()
        time.sleep(600)

    if mode == "optimize":
        study.optimize(objective, n_trials=1)
        return
    trial = study.ask()
    if mode == "ask+heartbeat":

        def beat():
            while True:
                storage.record_heartbeat(trial._trial_id)
                time.sleep(1)

        threading.Thread(target=beat, daemon=True).start()
    objective(trial)


def test_killed_trial_failed_by_heartbeat_and_retried(pg_server):  # noqa: F811
    url = pg_server.make_database("beat")
    storage = heartbeat_storage(url)
    study = optuna.create_study(storage=storage, study_name="beat")
    modes = ["optimize", "ask", "ask+heartbeat"]
    procs = []
    try:
        for i, mode in enumerate(modes):  # one at a time: each process pops its own enqueued trial
            study.enqueue_trial({"x": float(i)}, user_attrs={"mode": mode})
            ready = SPAWN.Event()
            procs.append(SPAWN.Process(target=hanging_worker, args=(url, mode, ready)))
            procs[-1].start()
            assert ready.wait(60), f"the {mode} worker did not start its trial"
        beating = {0, 2}  # the numbers of the trials whose process records heartbeats
        deadline = time.monotonic() + 20
        while True:  # killed before its first heartbeat is stored, a trial would never be stale
            with storage.engine.connect() as c:
                stored = {r[0] for r in c.execute(sqlalchemy.text("SELECT t.number FROM trial_heartbeats h JOIN "
                                                                  "trials t USING (trial_id)"))}  # fmt: skip
            if beating <= stored:
                break
            assert time.monotonic() < deadline, f"heartbeats stored only for trials {stored}"
            time.sleep(0.1)
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.join()

        deadline = time.monotonic() + 20
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # what another worker's optimize does before each trial
            states = [t.state for t in study.get_trials()[:3]]
            if states == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]:
                break
            assert time.monotonic() < deadline, f"states after the kill: {states}"
            time.sleep(0.25)
    finally:
        for p in procs:
            p.kill()
            p.join()

    retries = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs["failed_trial"], t.params) for t in retries] == [(0, {"x": 0.0}), (2, {"x": 2.0})]
    study.optimize(lambda t: t.suggest_float("x", 0, 100), n_trials=2)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert [(t.number, t.params, t.system_attrs["failed_trial"]) for t in done] == [
        (3, {"x": 0.0}, 0),
        (4, {"x": 2.0}, 2),
    ]
    # the trial asked without a heartbeat stays RUNNING for ever
    assert study.get_trials()[1].state == TrialState.RUNNING
