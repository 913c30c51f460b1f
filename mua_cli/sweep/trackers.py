"""Experiment trackers a sweep reports to (`--report-to`, like Hugging Face's `report_to`): each finished trial's
training-loss curve, its final metric and its hyperparameters, one tracker run per trial.

- `tensorboard`: event files under RUN/tensorboard/<trial>/ (tensorboardX): `tensorboard --logdir RUN/tensorboard`
- `mlflow`: an experiment named after the run's study, one MLflow run per trial; MLFLOW_TRACKING_URI, else the
  local store RUN/mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`)
- `wandb`: a W&B project `mua`, one run per trial, grouped by run folder; offline (RUN/wandb) unless WANDB_MODE
  says otherwise (`wandb sync RUN/wandb/offline-run-*`)

The trial store stays the truth: a tracker is a copy for dashboards, written once the trial is stored, and the
loss curve is also in the store as Optuna intermediate values (optuna-dashboard draws it). `mua worker`
processes do not report. The libraries are optional (`pip install 'mua-cli[trackers]'`; wandb: `'mua-cli[wandb]'`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

from ..errors import MuaError
from ..science.theory import lr_label
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec

TRACKERS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": ("tensorboardX", "trackers"), "mlflow": ("mlflow", "trackers"), "wandb": ("wandb", "wandb")}


def parse_report_to(value: str) -> list[str]:
    """`tensorboard,mlflow` → the trackers; "" or `none` → none. An unknown name is one line."""
    names = [v.strip().lower() for v in str(value or "").split(",") if v.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise MuaError(f"--report-to {value}: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def trial_name(spec: TrialSpec) -> str:
    what = "full-ft" if spec.rank == 0 else f"{spec.regime.replace(':', '')}-r{spec.rank}"
    return f"{what}-lr{lr_label(spec.lr).replace('^', '')}-s{spec.seed}"


def hparams(recipe: Recipe, spec: TrialSpec) -> dict:
    lora = spec.lora_settings(recipe.optim.alpha0)
    out = {"regime": spec.regime, "rank": spec.rank, "lr": spec.lr, "seed": spec.seed, "key": spec.key}
    out.update({k: v for k, v in lora.items() if v is not None})
    out.update({"model": recipe.model.name, "data": recipe.data.source, "steps": recipe.optim.steps,
                "batch_size": recipe.optim.batch_size})  # fmt: skip
    return out


MAX_CURVE_POINTS = 25  # enough to draw a curve; each point is a row Optuna writes (and reads) one query at a time


def intermediate_values(curve: list[float]) -> dict[int, float]:
    """A trial's training loss by step (0-based), as Optuna's intermediate values, so optuna-dashboard draws
    each trial's curve. At most MAX_CURVE_POINTS steps, evenly spaced, and the last; non-finite losses
    (the step a trial diverged) are left out."""
    every = max(1, math.ceil(len(curve) / MAX_CURVE_POINTS))
    steps = [*range(0, len(curve), every), *([len(curve) - 1] if curve and (len(curve) - 1) % every else [])]
    return {i: float(curve[i]) for i in steps if math.isfinite(curve[i])}


class Tracker:
    def trial(self, spec: TrialSpec, result: TrialResult, hp: dict) -> None: ...
    def close(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, study: str):
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        self.root, self.writer_class, self.hparams = Path(run_dir) / "tensorboard", SummaryWriter, hparams

    def trial(self, spec, result, hp):
        with self.writer_class(logdir=str(self.root / trial_name(spec))) as w:
            for step, loss in enumerate(result.loss_curve):
                if math.isfinite(loss):
                    w.add_scalar("train/loss", loss, step)
            metrics = {"hparam/metric": result.metric} if math.isfinite(result.metric) else {}
            if result.eval_loss is not None and math.isfinite(result.eval_loss):
                metrics["hparam/eval_loss"] = result.eval_loss
            hp = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in hp.items()}
            # the trial's own event file: add_hparams would open a second writer on the same file name
            for summary in self.hparams({**hp, "status": result.status}, metrics):
                w.file_writer.add_summary(summary)
            for k, v in metrics.items():
                w.add_scalar(k, v, len(result.loss_curve))


def local_mlflow_uri(run_dir: Path) -> str:
    """MLflow's local store in the run folder: an SQLite file (MLflow 3 refuses its old ./mlruns file store)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class MLflow(Tracker):
    def __init__(self, run_dir: Path, study: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or local_mlflow_uri(run_dir)
        for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables...": not for a sweep's log
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(study)
            self.experiment = found.experiment_id if found else self.client.create_experiment(study)

    def trial(self, spec, result, hp):
        from mlflow.entities import Metric, Param, RunTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = self.client.create_run(self.experiment, run_name=trial_name(spec))
            rid = run.info.run_id
            metrics = [Metric("loss", v, 0, i) for i, v in enumerate(result.loss_curve) if math.isfinite(v)]
            for name, v in (("metric", result.metric), ("eval_loss", result.eval_loss)):
                if v is not None and math.isfinite(v):
                    metrics.append(Metric(name, v, 0, len(result.loss_curve)))
            params = [Param(k, str(v)) for k, v in hp.items()]
            for i in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics a batch
                self.client.log_batch(rid, metrics=metrics[i : i + 1000], params=params if i == 0 else [],
                                      tags=[RunTag("status", result.status)] if i == 0 else [])  # fmt: skip
            self.client.set_terminated(rid, "FAILED" if result.status == "failed" else "FINISHED")


class WandB(Tracker):
    def __init__(self, run_dir: Path, study: str):
        import wandb

        self.wandb, self.dir, self.group = wandb, Path(run_dir), study

    def trial(self, spec, result, hp):
        run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mua"),
            group=self.group,
            name=trial_name(spec),
            config=hp,
            dir=str(self.dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
        )
        for step, loss in enumerate(result.loss_curve):
            if math.isfinite(loss):
                run.log({"train/loss": loss}, step=step)
        run.summary.update({"metric": result.metric, "status": result.status, "eval_loss": result.eval_loss})
        run.finish(quiet=True)


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def open_trackers(report_to: str, run_dir: Path, study: str) -> list[Tracker]:
    """The trackers named, opened before any trial runs: a missing library is one line, not a lost sweep."""
    out = []
    for name in parse_report_to(report_to):
        module, extra = PACKAGES[name]
        try:
            out.append(KINDS[name](run_dir, study))
        except ImportError:
            raise MuaError(f"--report-to {name} needs the {module} package: pip install 'mua-cli[{extra}]'") from None
    return out


class Reporting:
    """A sweep listener that passes everything on to `inner` and each finished trial to the trackers."""

    def __init__(self, inner, trackers: list[Tracker], recipe: Recipe):
        self.inner, self.trackers, self.recipe = inner, trackers, recipe

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def trial_done(self, spec: TrialSpec, result: TrialResult) -> None:
        hp = hparams(self.recipe, spec)
        for t in self.trackers:
            t.trial(spec, result, hp)
        self.inner.trial_done(spec, result)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
