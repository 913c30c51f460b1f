"""The one place mua reaches into Optuna's private attributes, because no public API serves.

A shared study's queue (shared.py) claims a WAITING trial by flipping its state with the storage's public
`set_trial_state_values(trial_id, ...)`, which only one process can win, and writes that trial's parameters,
attributes and heartbeat through the storage's other public methods. Both need what Optuna keeps private:
- the study's storage: `optuna.Study` exposes none (`study._storage`); `optuna.load_study` builds a new one, but
  with no heartbeat settings unless given them, and a second connection pool per call;
- a trial's storage id: `FrozenTrial._trial_id`. The public route (`storage.get_study_id_from_name`, then
  `get_trial_id_from_study_id_trial_number`) costs two queries per trial, on every claim of every worker.
- which RUNNING trials have no heartbeat at all (a claim cut off before its first beat): Optuna's stale-trial
  check passes them over, and only its table models (`optuna.storages._rdb.models`) can ask.
tests/test_optuna_private.py checks that all three still exist, are what shared.py assumes, and agree with the
public route where there is one, so that an Optuna release that moves them fails there, by name, rather than in a
worker mid-sweep."""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (its heartbeat settings included)."""
    return study._storage  # noqa: SLF001


def trial_id(trial: FrozenTrial) -> int:
    """A trial's id in its storage (not its number within the study)."""
    return trial._trial_id  # noqa: SLF001


def running_without_heartbeat(study: optuna.Study) -> set[int]:
    """Storage ids of the study's RUNNING trials that have no heartbeat row."""
    import sqlalchemy
    from optuna.storages._rdb import models

    storage = storage_of(study)
    rdb = getattr(storage, "_backend", storage)  # under Optuna's cache
    query = (
        sqlalchemy.select(models.TrialModel.trial_id)
        .outerjoin(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
        .where(
            models.TrialModel.study_id == study._study_id,  # noqa: SLF001
            models.TrialModel.state == optuna.trial.TrialState.RUNNING,
            models.TrialHeartbeatModel.trial_id.is_(None),
        )
    )
    with rdb.engine.connect() as conn:
        return {row[0] for row in conn.execute(query)}
