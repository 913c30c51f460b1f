"""One sweep shared by many workers through one Optuna study: PostgreSQL across machines, or the run folder's
SQLite file on one machine.

The planner (`mua sweep --study NAME`) queues every trial as a WAITING Optuna trial that carries its key; it
alone decides which LRs a finished round adds, under a planning lock, so no two processes queue one key. Any
number of workers (`mua worker`, and the planner itself) claim units from the queue: trials of one (regime,
rank, seed) flip from WAITING to RUNNING one by one, an atomic update that only one process wins. A worker
beats a heartbeat for what it holds; a trial whose worker was killed goes stale, is failed by the next worker
that looks, and queued again with the same key (Optuna's RetryHeartbeatStaleTrialCallback). A finished trial is
written once, its attributes then its state: a trial cut off in between is stale too, and runs again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..errors import MuaError
from ..spec.trial import TrialResult, TrialSpec
from .optuna_private import running_without_heartbeat, storage_of
from .optuna_private import trial_id as id_of
from .store import DISTRIBUTIONS, STORAGE_ERRORS, TrialStore
from .trackers import intermediate_values

# a worker's heartbeat for the trials it holds; a RUNNING trial without one for GRACE_S is stale: failed, and
# queued again (whole seconds, as Optuna takes them; the environment may shorten both, as the tests do)
HEARTBEAT_S = int(os.environ.get("MUA_HEARTBEAT_S", "5"))
GRACE_S = int(os.environ.get("MUA_GRACE_S", "30"))
MAX_RETRY = 5  # a trial whose worker died this many times is left failed
POLL_S = 1.0  # how often an idle worker looks at the queue again
SCHEMA = 1  # what this mua writes into a shared study; a study of another schema is refused
STATE, RECIPE, SCHEMA_KEY = "mua_state", "mua_recipe", "mua_schema"  # the study's attributes
PLANNER_SEEN = "mua_planner_seen"  # when the planner last said it is alive (its clock, seconds since the epoch)
PLANNER_GONE_S = 300  # a worker with nothing to claim stops when the planner has been silent this long


class SharedStudy(TrialStore):
    """A study many processes work on: the trial store, made in a storage with heartbeats (`shared_storage`),
    its schema checked, and the queue below. `create` (the planner) makes it; `join` (`mua worker`) opens it
    for work where it exists."""

    shared = True

    def _storage(self, url: str) -> optuna.storages.RDBStorage:
        return shared_storage(url)

    def _opened(self, study: optuna.Study) -> None:
        check_schema(study)

    @classmethod
    def join(cls, run_dir: Path, storage: str | None, name: str) -> SharedStudy:
        """The study, opened for work. Opened read-only first, so that a study that does not exist is one line
        and nothing is created in the database."""
        store = cls.open(run_dir, storage, name)
        store.writable = True
        store.study = store._open(store.url)
        return store


def shared_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage with heartbeats and retries of trials whose worker died. PostgreSQL: a connection is checked
    before use, so a server restart costs nothing. SQLite: every transaction takes the write lock when it begins
    (BEGIN IMMEDIATE), so two processes cannot both claim one trial; Python's sqlite3 would otherwise read
    outside any transaction."""
    sqlite = url.startswith("sqlite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True},
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "connect", _no_driver_transactions)
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
        storage.engine.dispose()  # the connection that made the tables predates the listeners
    return storage


def _no_driver_transactions(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def planning_lock(storage: optuna.storages.RDBStorage, name: str, lock_dir: Path | None) -> Iterator[None]:
    """One planner at a time queues trials: PostgreSQL's advisory lock (held by a connection of its own), or a
    lock on the run folder of an SQLite store (SQLite is one machine's). Other databases: no lock, no promise."""
    if storage.engine.dialect.name == "postgresql":
        engine = storage.engine
        key = int.from_bytes(hashlib.sha256(f"mua:{name}".encode()).digest()[:7], "big")  # the same in every process
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    if lock_dir is None:
        yield
        return
    import fcntl

    fd = os.open(lock_dir, os.O_RDONLY)  # flock on the folder: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_schema(study: optuna.Study) -> None:
    found = study.user_attrs.get(SCHEMA_KEY)
    if found is not None and found != SCHEMA:
        raise MuaError(
            f"study {study.study_name!r} was made by another version of mua (schema {found}; this one reads "
            f"{SCHEMA}): sweep into a new --study"
        )


def keys_in_queue(study: optuna.Study) -> set[str]:
    """Keys of trials waiting or running."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    return {t.user_attrs["key"] for t in trials if "key" in t.user_attrs}


def enqueue(study: optuna.Study, specs: list[TrialSpec], meta_of: Callable[[TrialSpec], dict]) -> int:
    """Queues `specs` (the caller holds the planning lock and has left out finished keys); a key already waiting
    or running is not queued again. Returns how many were queued."""
    queued = keys_in_queue(study)
    n = 0
    for spec in specs:
        if spec.key in queued:
            continue
        study.enqueue_trial(_params(spec), user_attrs={"key": spec.key, **meta_of(spec)})
        queued.add(spec.key)
        n += 1
    return n


def _params(spec: TrialSpec) -> dict:
    return {"regime": spec.regime, "rank": spec.rank, "lr": spec.lr, "seed": spec.seed}


def _spec(t: optuna.trial.FrozenTrial) -> TrialSpec | None:
    """A queued trial's spec (its params wait in fixed_params, which a retried copy keeps); None while another
    process's claim is still writing them."""
    p = {**t.params, **t.system_attrs.get("fixed_params", {})}
    if not {"regime", "rank", "lr", "seed"} <= set(p) or "key" not in t.user_attrs:
        return None
    return TrialSpec(p["regime"], int(p["rank"]), float(p["lr"]), int(p["seed"]), t.user_attrs["key"])


def claim(study: optuna.Study, k: int, batchable: Callable[[TrialSpec], bool]) -> list[tuple[int, TrialSpec]]:
    """Up to k waiting trials of one (regime, rank, seed) that this process now holds (RUNNING); [] if none."""
    storage = storage_of(study)  # set_trial_state_values is the storage's public method
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    out: list[tuple[int, TrialSpec]] = []
    specs = [(t, spec) for t in waiting if (spec := _spec(t)) is not None]
    for t, spec in sorted(specs, key=lambda ts: (ts[1].regime, ts[1].rank, ts[1].seed, ts[1].lr)):
        if out and (len(out) >= k or not batchable(spec) or (spec.regime, spec.rank, spec.seed) != _group(out)):
            continue
        try:
            if storage.set_trial_state_values(id_of(t), state=TrialState.RUNNING):
                first_beat(study, id_of(t))
                storage.set_trial_system_attr(id_of(t), "mua_worker", worker_id())
                for name, value in _params(spec).items():  # what readers of finished trials go by
                    dist = DISTRIBUTIONS[name]
                    storage.set_trial_param(id_of(t), name, dist.to_internal_repr(value), dist)
                out.append((id_of(t), spec))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished by another worker in the meantime
        if out and not batchable(out[0][1]):
            break
    return out


def first_beat(study: optuna.Study, trial_id: int, tries: int = 3) -> None:
    """The first heartbeat of a trial this process has just flipped to RUNNING. A claim and its first beat hold
    or fail together: the beat is tried again (it writes one row per trial, so a retry is harmless), and where it
    still cannot be written the trial goes back to the queue before the error is raised. A RUNNING trial without a
    heartbeat would otherwise never go stale, and the planner would wait for it forever."""
    storage = storage_of(study)
    for attempt in range(tries):
        try:
            storage.record_heartbeat(trial_id)
            return
        except STORAGE_ERRORS:
            if attempt == tries - 1:
                with contextlib.suppress(Exception):  # the database is down: the reaper's no-heartbeat rule is left
                    release(study, [(trial_id, None)])
                raise
            time.sleep(0.5 * (attempt + 1))


def _group(held: list[tuple[int, TrialSpec]]) -> tuple:
    s = held[0][1]
    return s.regime, s.rank, s.seed


def finish(study: optuna.Study, trial_id: int, result: TrialResult, meta: dict) -> None:
    """Writes a held trial's result: its attributes, then its state (what readers go by)."""
    storage = storage_of(study)
    attrs = {**result.to_dict(), **meta}
    status = attrs.pop("status")
    for name, value in [*attrs.items(), ("status", status)]:  # status last: present means every attribute is
        storage.set_trial_user_attr(trial_id, name, value)
    for step, loss in intermediate_values(result.loss_curve).items():  # the curve, as a local store keeps it
        storage.set_trial_intermediate_value(trial_id, step, loss)
    if result.status == "failed":
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    else:
        storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[result.metric])


def release(study: optuna.Study, held: list[tuple[int, TrialSpec]]) -> None:
    """Hands trials this process holds back to the queue (Ctrl-C): each is failed and queued again at once."""
    storage = storage_of(study)
    for trial_id, _ in held:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_system_attr(trial_id, "mua_released", True)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            frozen = storage.get_trial(trial_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback(max_retry=None)(study, frozen)


def reap(study: optuna.Study) -> None:
    """Fails the stale trials of dead workers, which queues them again: those whose heartbeat stopped, and those
    RUNNING with no heartbeat at all for GRACE_S (a claim cut off before its first beat), which Optuna's check
    passes over."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now, beatless = time.monotonic(), running_without_heartbeat(study)
    for trial_id in list(_BEATLESS_SINCE):
        if trial_id not in beatless:
            del _BEATLESS_SINCE[trial_id]
    # timed by this process's clock from when it first saw the trial so: no two machines' clocks are compared
    stale = [t for t in beatless if now - _BEATLESS_SINCE.setdefault(t, now) > GRACE_S]
    if stale:
        release(study, [(t, None) for t in stale])


_BEATLESS_SINCE: dict[int, float] = {}  # trial id -> when this process first saw it RUNNING without a heartbeat


def counts(study: optuna.Study) -> tuple[int, int]:
    """(waiting, running) trials that carry a key."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING and "key" in t.user_attrs)
    return waiting, sum(1 for t in trials if t.state == TrialState.RUNNING and "key" in t.user_attrs)


class Heartbeat:
    """A thread that beats for the trials this process holds, so that no other worker takes them as dead."""

    def __init__(self, study: optuna.Study):
        self.study, self.held, self._stop = study, [], threading.Event()
        self.thread = threading.Thread(target=self._beat, name="mua-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        storage = storage_of(self.study)
        while not self._stop.wait(HEARTBEAT_S):
            for trial_id, _ in list(self.held):
                with contextlib.suppress(Exception):  # a database restarting: the next beat tries again
                    storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=HEARTBEAT_S + 1)


def worker_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def wait(seconds: float = POLL_S) -> None:
    time.sleep(seconds)


def planner_gone(study: optuna.Study) -> bool:
    """Whether the planner stopped (an error) or has not been seen for PLANNER_GONE_S (killed)."""
    attrs = study.user_attrs
    if attrs.get(STATE) == "stopped":
        return True
    seen = attrs.get(PLANNER_SEEN)
    return seen is not None and time.time() - float(seen) > PLANNER_GONE_S
