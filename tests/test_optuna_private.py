"""What mua takes from libraries' private parts, checked against the versions installed: a release that moves
them fails here, by name. Optuna: sweep/optuna_private.py. typer: nothing private (ui/console.py catches typer's
public TyperException, the base of the click typer vendors)."""

from __future__ import annotations

import inspect

import optuna
import pytest
import typer
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from mua_cli.sweep import optuna_private
from mua_cli.ui.console import USAGE_ERRORS

# The storage methods shared.py calls with a trial id, and the parameters it passes by name
STORAGE_CALLS = {
    "set_trial_state_values": ("trial_id", "state", "values"),
    "record_heartbeat": ("trial_id",),
    "set_trial_system_attr": ("trial_id", "key", "value"),
    "set_trial_user_attr": ("trial_id", "key", "value"),
    "set_trial_param": ("trial_id", "param_name", "param_value_internal", "distribution"),
    "get_trial": ("trial_id",),
}


@pytest.fixture
def study(tmp_path):
    storage = RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    s = optuna.create_study(storage=storage, study_name="probe")
    s.enqueue_trial({"x": 1.0})
    s.enqueue_trial({"x": 2.0})
    return s


def test_the_private_attributes_still_exist_and_agree_with_the_public_route(study):
    storage = optuna_private.storage_of(study)
    assert isinstance(storage, BaseStorage), f"optuna {optuna.__version__}: Study._storage is {type(storage)}"
    study_id = storage.get_study_id_from_name(study.study_name)  # the public route, two queries a trial
    for t in study.get_trials(deepcopy=False):
        tid = optuna_private.trial_id(t)
        assert isinstance(tid, int), f"optuna {optuna.__version__}: FrozenTrial._trial_id is {tid!r}"
        assert tid == storage.get_trial_id_from_study_id_trial_number(study_id, t.number)


def test_the_storage_methods_take_a_trial_id_as_shared_py_calls_them(study):
    for name, params in STORAGE_CALLS.items():
        method = getattr(RDBStorage, name, None)
        assert method is not None, f"optuna {optuna.__version__}: RDBStorage.{name} is gone"
        have = list(inspect.signature(method).parameters)[1:]
        assert have[: len(params)] == list(params), f"optuna {optuna.__version__}: RDBStorage.{name}{tuple(have)}"
    # and they act as claim() relies on: one process wins a WAITING trial's flip to RUNNING, no other
    storage = optuna_private.storage_of(study)
    t = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[0]
    assert storage.set_trial_state_values(optuna_private.trial_id(t), state=TrialState.RUNNING)
    assert not storage.set_trial_state_values(optuna_private.trial_id(t), state=TrialState.RUNNING)


def test_typer_usage_errors_are_caught_by_a_public_class():
    """A command line's mistake must reach OneLineErrors' `except USAGE_ERRORS`: typer's BadParameter (what
    typer raises, and what its vendored click's UsageError shares a base with) is one of them."""
    assert issubclass(typer.BadParameter, USAGE_ERRORS), typer.BadParameter.__mro__
    e = typer.BadParameter("no good")
    assert e.format_message() == "Invalid value: no good" and e.exit_code == 2 and hasattr(e, "ctx")


def test_running_without_heartbeat_reads_optunas_tables(study):
    """The query on Optuna's private ORM models (optuna.storages._rdb.models) that finds RUNNING trials no worker
    beats for: one claimed without a heartbeat is found; once it beats, or when it is only WAITING, it is not."""
    from optuna.storages._rdb import models

    assert hasattr(models, "TrialModel") and hasattr(models, "TrialHeartbeatModel"), f"optuna {optuna.__version__}"
    storage = optuna_private.storage_of(study)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    claimed, queued = (optuna_private.trial_id(t) for t in waiting)
    assert optuna_private.running_without_heartbeat(study) == set()
    storage.set_trial_state_values(claimed, state=TrialState.RUNNING)
    assert optuna_private.running_without_heartbeat(study) == {claimed}
    storage.record_heartbeat(claimed)
    assert optuna_private.running_without_heartbeat(study) == set()
    assert queued not in optuna_private.running_without_heartbeat(study)
