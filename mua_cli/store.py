"""The trial store: Optuna storage (an SQLite file in the run folder, or any Optuna storage URL,
e.g. PostgreSQL, when several machines share a sweep), read back as one pandas DataFrame.

A trial is written once, when it has finished (Optuna's `add_trial`), so a sweep cut off mid-trial
leaves nothing half-written, and the trial's key (a hash of everything that changes its outcome)
makes re-runs skip it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from .errors import MuaError
from .theory import FULL, MAX_RANK, REGIMES
from .trial import TrialResult, TrialSpec

STUDY = "mua"
DB_NAME = "trials.db"
_DISTRIBUTIONS = {
    "regime": CategoricalDistribution([*REGIMES, FULL]),
    "rank": IntDistribution(0, MAX_RANK),
    "lr": FloatDistribution(1e-12, 1e6, log=True),
    "seed": IntDistribution(0, 1 << 31),
}
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def storage_url(run_dir: Path, storage: str | None = None) -> str:
    return storage or os.environ.get("MUA_STORAGE") or f"sqlite:///{Path(run_dir).resolve() / DB_NAME}"


class TrialStore:
    def __init__(self, run_dir: Path, storage: str | None = None, create: bool = True):
        self.run_dir = Path(run_dir)
        self.url = storage_url(self.run_dir, storage)
        db = self.run_dir / DB_NAME
        if self.url.startswith("sqlite:///") and not create and not db.is_file():
            raise MuaError(f"{self.run_dir} holds no trial store ({DB_NAME}); run `mua sweep --out {self.run_dir}`")
        if self.url.startswith("sqlite:///"):
            if db.is_file():
                _check_sqlite(db)
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise MuaError(f"run folder {self.run_dir} is a file; name a folder with --out")
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MuaError(f"cannot create the run folder {self.run_dir}: {e.strerror or e}") from None
        try:
            self.study = optuna.create_study(storage=self.url, study_name=STUDY, load_if_exists=True)
        except Exception as e:  # sqlalchemy's errors for an unreadable or foreign database
            raise MuaError(f"cannot open the trial store {self.url}: {_first_line(e)}") from None

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """One trial per key: a failed one is replaced by its retry, and a finished result is final."""
        latest: dict[str, optuna.trial.FrozenTrial] = {}
        for t in self.study.get_trials(deepcopy=False):
            key = t.user_attrs.get("key")
            if key is None:
                continue
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
            distributions=_DISTRIBUTIONS,
            value=None if state == TrialState.FAIL else result.metric,
            state=state,
            user_attrs=attrs,
        )
        self.study.add_trial(trial)


def load_trials(run_dir: Path, storage: str | None = None) -> pd.DataFrame:
    """Every stored trial of a run as a DataFrame (one row a trial)."""
    df = frame(TrialStore(run_dir, storage, create=False))
    if df.empty:
        raise MuaError(f"{run_dir} has no trials yet; run `mua sweep --out {run_dir}` first")
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


def _check_sqlite(db: Path) -> None:
    with open(db, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        raise MuaError(f"{db} is not an SQLite trial store (corrupted?); it was left untouched")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
