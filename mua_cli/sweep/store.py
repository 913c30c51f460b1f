"""The trial store: Optuna storage (an SQLite file in the run folder, or any Optuna storage URL,
e.g. PostgreSQL, when several machines share a sweep), read back as one pandas DataFrame.

A trial is written once, when it has finished (Optuna's `add_trial`), so a sweep cut off mid-trial
leaves nothing half-written, and the trial's key (a hash of everything that changes its outcome)
makes re-runs skip it.

The run folder's SQLite file is checked before anything is written to it, and opened read-only by the
commands that only read (`fit`, `transfer`), so that they work on a read-only folder or mount and can never
change a store they only read. A store that cannot be read or written (corrupted, read-only, a full disk)
is one line naming the file and the cause.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import sqlite3
from pathlib import Path

import optuna
import pandas as pd
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ..errors import MuaError
from ..science.theory import FULL, MAX_RANK, REGIMES
from ..spec.config import LR_MAX, LR_MIN
from ..spec.trial import TrialResult, TrialSpec
from .store_file import DB_NAME, _check_sqlite, _corrupted_message, _read_only, make_tables_once, tables_made
from .trackers import intermediate_values
from .urls import check_driver, connection_problem, redact, scrub, with_driver

STUDY = "mua"  # every run's study before they were named after their folders; such runs are read as they are
DISTRIBUTIONS = {
    "regime": CategoricalDistribution([*REGIMES, FULL]),
    "rank": IntDistribution(0, MAX_RANK),
    "lr": FloatDistribution(LR_MIN, LR_MAX, log=True),
    "seed": IntDistribution(0, 1 << 31),
}
# what a store's backend raises when the file or the disk under it fails (optuna wraps sqlalchemy's errors)
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, OSError)
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def storage_url(run_dir: Path, storage: str | None = None) -> str:
    return with_driver(storage or os.environ.get("MUA_STORAGE") or _local_url(run_dir))


def study_name(run_dir: Path) -> str:
    """A run's own study, named after its folder (apart in optuna-dashboard; a store's one study keeps its name)."""
    return Path(run_dir).resolve().name or STUDY


def _local_url(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / DB_NAME}"


class TrialStore:
    """A run's trials: its own study in the run folder's SQLite file (or at a storage URL). Made by `create`
    (to sweep into) or `open` (to read); a shared study (shared.py) is the same store with a work queue.

    Opened to read, the run folder's SQLite file is opened read-only (SQLite's `mode=ro`), never created, locked
    for writing or changed."""

    shared = False  # a shared study (shared.SharedStudy)

    def __init__(self, run_dir: Path, url: str, name: str, writable: bool):
        self.run_dir, self.url, self.name, self.writable = Path(run_dir), url, name, writable
        # the run folder's own file (not a shared storage URL): checked, and opened read-only where only read
        self.db = self.run_dir / DB_NAME if url == _local_url(self.run_dir) else None
        self.study: optuna.Study | None = None
        self.rdb = None  # the storage object of a writable study

    @classmethod
    def _made(cls, run_dir: Path, storage: str | None, name: str | None, writable: bool) -> TrialStore:
        store = cls(run_dir, storage_url(Path(run_dir), storage), name or study_name(Path(run_dir)), writable)
        if name is not None:
            store.shared = True  # read or written as the study named, not the run's own
        if (problem := check_driver(store.url)) is not None:
            raise MuaError(problem)
        if store.db is not None and store.db.is_file():
            _check_sqlite(store.db, store.run_dir)
        return store

    @classmethod
    def open(cls, run_dir: Path, storage: str | None = None, study: str | None = None) -> TrialStore:
        """An existing store, to read (`study`: that study; None: the run's own). A run folder without one, or
        a database without that study, is one line."""
        store = cls._made(run_dir, storage, study, writable=False)
        db = store.db
        if db is None:
            store.study = store._open(store.url)
        elif not db.is_file():
            raise MuaError(f"{store.run_dir} holds no trial store ({DB_NAME}); run `mua sweep --out {store.run_dir}`")
        elif db.stat().st_size:  # an empty file: a sweep killed while creating it; no trials
            store.study = store._open("sqlite://", creator=lambda: _read_only(db))
        return store

    @classmethod
    def create(cls, run_dir: Path, storage: str | None = None, study: str | None = None) -> TrialStore:
        """The store a sweep writes, made where it is not yet (the run folder too); one that cannot be made
        leaves nothing behind to pass for a run."""
        store = cls._made(run_dir, storage, study, writable=True)
        run_dir, db = store.run_dir, store.db
        if run_dir.exists() and not run_dir.is_dir():
            raise MuaError(f"run folder {run_dir} is a file; name a folder with --out")
        new_dir, new_db = not run_dir.exists(), db is not None and not db.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)  # recipe.yaml and fit.json live there, whatever the URL
        except OSError as e:
            raise MuaError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None
        try:
            if not os.access(run_dir, os.W_OK) or (db is not None and db.exists() and not os.access(db, os.W_OK)):
                raise MuaError(_read_only_message(run_dir, "not writable"))
            store.study = store._open(store.url)
        except MuaError:
            if new_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif new_db:
                for path in (db, db.with_name(DB_NAME + "-journal")):
                    path.unlink(missing_ok=True)
            raise
        return store

    def _storage(self, url: str):
        """The storage a writable study is made in (a shared study adds its heartbeats)."""
        return optuna.storages.get_storage(url)

    def _opened(self, study: optuna.Study) -> None:
        """Checks a study opened for writing (a shared study: its schema)."""

    def _open(self, url: str, creator=None) -> optuna.Study | None:
        """The study, created when writable; None when a read-only store has none (killed while being made)."""
        try:
            if not self.writable:
                kwargs = {"creator": creator} if creator else None
                try:
                    if not tables_made(url):  # Optuna's opening would write (stamp alembic) beside their maker
                        raise sqlalchemy.exc.NoSuchTableError("version_info")
                    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True)
                except STORAGE_ERRORS as e:
                    if "version_info" not in str(_root(e)):
                        raise
                    if self.shared:  # a database without Optuna's tables: no study at all
                        raise MuaError(self._no_study(None)) from None
                    return None
                try:
                    return optuna.load_study(study_name=self.name, storage=storage)
                except KeyError:
                    if self.shared:
                        raise MuaError(self._no_study(storage)) from None
                    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
                    if len(names) == 1:  # a run folder swept with `--study NAME`: its one study, unnamed
                        self.name = names[0]
                        return optuna.load_study(study_name=self.name, storage=storage)
                    return None
            make_tables_once(url)
            storage = self.rdb = self._storage(url)
            if not self.shared:  # a run folder's one study keeps its name (older runs': `mua`)
                names = optuna.get_all_study_names(storage)
                if len(names) == 1 and self.name not in names:
                    self.name = names[0]
            study = optuna.create_study(storage=storage, study_name=self.name, load_if_exists=True)
            self._opened(study)
            return study
        except STORAGE_ERRORS as e:
            raise self._error(e, "open" if not self.writable else "create") from None
        except MuaError:
            raise
        except Exception as e:  # sqlalchemy's or alembic's errors for a foreign database or another optuna
            raise MuaError(f"cannot open the trial store {redact(self.url)}: {self._line(e)}") from None

    def _no_study(self, storage) -> str:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)] if storage is not None else []
        there = f"; studies there: {', '.join(names)}" if names else "; it holds none"
        return f"no study {self.name!r} in {redact(self.url)}{there} (`mua sweep --study NAME` plans one)"

    def _line(self, e: BaseException) -> str:
        """A driver's message, without the password, and what it means where it is one a user can fix."""
        text = scrub(_first_line(_root(e)), self.url)
        meaning = connection_problem(text)
        return f"{meaning} ({text})" if meaning else text

    def _error(self, e: BaseException, doing: str) -> MuaError:
        """One line for a store that failed under us: which file, and whether it is corrupted, read-only or full."""
        cause = _root(e)
        text = _first_line(cause).lower()
        code = getattr(cause, "errno", None)
        where = str(self.db) if self.db is not None else redact(self.url)
        if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text:
            if doing == "create":
                return MuaError(f"cannot create the trial store {where}: disk full ({_first_line(cause)}); "
                                "free some space and run again")  # fmt: skip
            return MuaError(
                f"cannot write the trial store {where}: disk full ({_first_line(cause)}); the trials finished "
                "before are stored: free some space and run the same command again to resume"
            )
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text:
            return MuaError(_read_only_message(self.run_dir, _first_line(cause)))
        if "malformed" in text or "not a database" in text or "encrypted" in text:
            return MuaError(_corrupted_message(self.run_dir, _first_line(cause)))
        if "no such table" in text:
            return MuaError(f"{where} is an SQLite database but not a trial store ({_first_line(cause)})")
        verb = "read" if doing == "open" else "write"
        return MuaError(f"cannot {verb} the trial store {where}: {self._line(cause)}")

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """One trial per key: a failed one is replaced by its retry, and a finished result is final."""
        if self.study is None:
            return []
        try:
            stored = self.study.get_trials(deepcopy=False)
        except STORAGE_ERRORS as e:
            raise self._error(e, "open") from None
        except ValueError as e:  # a trial's JSON garbled on disk, where SQLite's own structure is whole
            raise MuaError(
                _corrupted_message(self.run_dir, f"a trial's data does not parse: {_first_line(e)}")
            ) from None
        latest: dict[str, optuna.trial.FrozenTrial] = {}
        for t in stored:
            key = t.user_attrs.get("key")
            failed = t.state == TrialState.FAIL and t.user_attrs.get("status") == "failed"
            if key is None or not (t.state == TrialState.COMPLETE or failed):
                continue  # queued or running in a shared study (shared.py), or a dead worker's, queued again
            old = latest.get(key)
            if old is None or old.user_attrs.get("status") == "failed":
                latest[key] = t
        return list(latest.values())

    def keys(self, final_only: bool = False) -> set[str]:
        """Keys of the stored trials; with final_only, leave out failed ones (a sweep runs them again)."""
        return {
            t.user_attrs["key"] for t in self.trials() if not (final_only and t.user_attrs.get("status") == "failed")
        }

    def add(self, spec: TrialSpec, result: TrialResult, meta: dict) -> None:
        state = TrialState.FAIL if result.status == "failed" else TrialState.COMPLETE
        attrs = {"key": spec.key, **result.to_dict(), **meta}
        trial = optuna.trial.create_trial(
            params={"regime": spec.regime, "rank": spec.rank, "lr": spec.lr, "seed": spec.seed},
            distributions=DISTRIBUTIONS,
            value=None if state == TrialState.FAIL else result.metric,
            state=state,
            user_attrs=attrs,
            intermediate_values=intermediate_values(result.loss_curve),
        )
        try:
            self.study.add_trial(trial)  # one transaction: a trial is stored whole or not at all
        except STORAGE_ERRORS as e:
            raise self._error(e, "write") from None

    def info(self) -> dict:
        """What the sweep recorded about the run besides its trials (e.g. `max_lora_rank`); {} for older runs."""
        if self.study is None:
            return {}
        try:
            return dict(self.study.user_attrs)
        except STORAGE_ERRORS as e:
            raise self._error(e, "open") from None

    def set_info(self, **values) -> None:
        """Records `values` with the run; a value already recorded is not written again (a finished sweep
        resumed leaves its store's bytes as they were)."""
        old = self.info()
        try:
            for k, v in values.items():
                if old.get(k) != v:
                    self.study.set_user_attr(k, v)
        except STORAGE_ERRORS as e:
            raise self._error(e, "write") from None


def load_trials(run_dir: Path, storage: str | None = None, study: str | None = None) -> pd.DataFrame:
    """Every stored trial of a run as a DataFrame (one row a trial), read without writing to the store.

    `attrs["info"]` holds what the sweep recorded about the run besides the trials (`TrialStore.info`)."""
    store = TrialStore.open(run_dir, storage, study)
    df = frame(store)
    if df.empty:
        where = f"study {store.name!r}" if store.shared else str(run_dir)
        raise MuaError(f"{where} has no finished trials yet; run `mua sweep` (or `mua worker`) first")
    df.attrs["info"] = store.info()
    return df


def frame(store: TrialStore) -> pd.DataFrame:
    """A store's trials as a DataFrame, sorted by regime, rank, LR and seed; empty when it has none."""
    rows = []
    for t in store.trials():
        a = dict(t.user_attrs)
        metric = a.get("metric", math.nan)
        rows.append(
            {
                "number": t.number,
                **t.params,
                "status": a.get("status"),
                "metric": math.inf if a.get("status") == "diverged" else metric,
                **{k: v for k, v in a.items() if k not in ("metric", "status")},
            }
        )
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    df["rank"] = df["rank"].astype(int)
    return df.sort_values(["regime", "rank", "lr", "seed"]).reset_index(drop=True)


def _read_only_message(run_dir: Path, why: str) -> str:
    return (
        f"run folder {run_dir} is read-only ({why}): a sweep stores its trials there; use another --out folder "
        "(`mua fit` and `mua transfer` read a read-only run)"
    )


def _root(e: BaseException) -> BaseException:
    """The first cause of a chain: the DBAPI's or the OS's own error under optuna's and sqlalchemy's wrappers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "orig", None) or e.__cause__
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    return e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
