"""What dashboards and trackers see of a sweep: each trial's loss curve as Optuna intermediate values, a study
named after its run folder (old runs' `mua` studies still read and resume), `--report-to tensorboard|mlflow`,
and `mua trials --format csv|json`."""

from __future__ import annotations

import builtins
import csv
import io
import json
import struct

import optuna
import pytest
from typer.testing import CliRunner

from mua_cli.errors import MuaError
from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.store import DB_NAME, load_trials
from mua_cli.sweep.stream import run_sweep
from mua_cli.sweep.trackers import intermediate_values, trial_name
from mua_cli.ui.cli import app


def _small(micro_recipe_path, **kw):
    return load_recipe(str(micro_recipe_path), ranks="4", regimes="B:1", lrs="2^-8:2^-6", max_extend=0, **kw)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, model_cache):
    """One small sweep (3 trials) reporting to TensorBoard and MLflow's local file store."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("mlflow")
    import yaml

    from tests.conftest import TINY_TEST_RECIPE

    tmp = tmp_path_factory.mktemp("tracked")
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUA_CACHE", str(model_cache))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = tmp / "my-run"
        run_sweep(_small(path, report_to="tensorboard,mlflow"), run, "cpu")
    return run


def test_each_trial_stores_its_loss_curve_as_intermediate_values(tracked):
    study = optuna.load_study(study_name="my-run", storage=f"sqlite:///{tracked / DB_NAME}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3
    for t in trials:
        curve = t.user_attrs["loss_curve"]
        assert len(curve) == 12
        assert t.intermediate_values == {i: v for i, v in enumerate(curve)}


def test_long_curves_are_thinned_to_at_most_25_points_keeping_the_last():
    curve = [float(i) for i in range(1234)]
    values = intermediate_values(curve)
    assert len(values) <= 25 + 1 and 0 in values and 1233 in values
    assert all(values[k] == curve[k] for k in values)
    assert intermediate_values([1.0, float("inf")]) == {0: 1.0}


def test_study_is_named_after_its_run_folder_and_old_mua_studies_still_read_and_resume(tracked, tmp_path):
    assert optuna.get_all_study_names(f"sqlite:///{tracked / DB_NAME}") == ["my-run"]
    old = tmp_path / "old"
    old.mkdir()
    optuna.copy_study(
        from_study_name="my-run",
        from_storage=f"sqlite:///{tracked / DB_NAME}",
        to_storage=f"sqlite:///{old / DB_NAME}",
        to_study_name="mua",
    )
    assert len(load_trials(old)) == 3
    import yaml

    from tests.conftest import TINY_TEST_RECIPE

    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    again = run_sweep(_small(path), old, "cpu")
    assert again.ran == 0 and again.skipped == 3
    assert optuna.get_all_study_names(f"sqlite:///{old / DB_NAME}") == ["mua"]


def _tfrecords(path):
    """The records of a TFRecord file: length (8 bytes), its CRC (4), data, the data's CRC (4)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_event_files_hold_each_trials_loss_curve(tracked):
    from tensorboardX.proto import event_pb2

    df = load_trials(tracked)
    folders = sorted(p.name for p in (tracked / "tensorboard").iterdir())
    assert folders == sorted(trial_name(_spec(row)) for _, row in df.iterrows())
    for _, row in df.iterrows():
        scalars = {}
        for f in (tracked / "tensorboard" / trial_name(_spec(row))).glob("events.out.tfevents.*"):
            for rec in _tfrecords(f):
                ev = event_pb2.Event.FromString(rec)
                for v in ev.summary.value:
                    if v.tag == "train/loss":
                        scalars[ev.step] = v.simple_value
        assert sorted(scalars) == list(range(12))
        assert [scalars[i] for i in range(12)] == pytest.approx(row["loss_curve"], rel=1e-6)


def test_mlflow_local_store_holds_one_run_per_trial_with_curve_metric_and_hparams(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked / 'mlflow.db'}")
    exp = client.get_experiment_by_name("my-run")
    runs = client.search_runs([exp.experiment_id])
    df = load_trials(tracked)
    assert len(runs) == len(df) == 3
    by_key = {r.data.params["key"]: r for r in runs}
    for _, row in df.iterrows():
        r = by_key[row["key"]]
        assert r.data.params["regime"] == "B:1" and float(r.data.params["lr"]) == row["lr"]
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(row["loss_curve"])
        assert r.data.metrics["metric"] == pytest.approx(row["metric"])


def _spec(row):
    from mua_cli.spec.trial import TrialSpec

    return TrialSpec(row["regime"], int(row["rank"]), float(row["lr"]), int(row["seed"]), row["key"])


def test_mua_trials_exports_json_and_csv(tracked):
    res = CliRunner().invoke(app, ["trials", str(tracked), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    df = load_trials(tracked)
    assert [r["key"] for r in rows] == list(df["key"])
    assert rows[0]["loss_curve"] == df.iloc[0]["loss_curve"] and {"regime", "rank", "lr", "metric"} <= set(rows[0])
    res = CliRunner().invoke(app, ["trials", str(tracked), "-f", "csv"])
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["key"] for r in table] == list(df["key"])
    assert [float(r["lr"]) for r in table] == list(df["lr"])
    assert json.loads(table[0]["loss_curve"]) == df.iloc[0]["loss_curve"]
    res = CliRunner().invoke(app, ["trials", str(tracked), "--format", "xml"])
    assert res.exit_code == 2 and "unknown --format 'xml'" in res.output


def test_unknown_tracker_is_one_line_when_the_recipe_loads(micro_recipe_path):
    with pytest.raises(MuaError, match="unknown tracker 'comet'"):
        _small(micro_recipe_path, report_to="tensorboard,comet")


def test_missing_tracker_library_is_one_line_before_any_trial(micro_recipe_path, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(MuaError, match=r"--report-to wandb needs the wandb package: pip install 'mua-cli\[wandb\]'"):
        run_sweep(_small(micro_recipe_path, report_to="wandb"), tmp_path / "run", "cpu")
    assert not (tmp_path / "run").exists()  # nothing left to pass for a run


def test_a_shared_studys_trials_keep_their_loss_curves_too(micro_recipe_path, tmp_path):
    """Trials finished through a shared study's queue (sweep/shared.py `finish`) store the same curve."""
    run_sweep(_small(micro_recipe_path), tmp_path / "run", "cpu", study="shared")
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'run' / DB_NAME}")
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        assert t.intermediate_values == dict(enumerate(t.user_attrs["loss_curve"]))
