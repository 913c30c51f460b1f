"""mua's public API, for scripts, benchmarks and tests: sweep a recipe, fit a run, predict a learning rate.
The `mua` command is a thin layer over these; everything else in mua_cli is internal and may move.

    from mua_cli.api import load_recipe, run_sweep, fit, predict
    run_sweep(load_recipe("tiny"), "runs/tiny")
    print(predict(fit("runs/tiny"), "full-ft").lr)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_atomic
from .errors import MuaError
from .science.fit import FitResult, fit_run
from .science.full_ft import predict_full
from .science.theory import MAX_RANK, TRANSFER_REGIME, get_regime
from .science.transfer import CHOICES, FULL_TARGET, Prediction, predict_rank
from .spec.recipe import Recipe, load_recipe
from .sweep.sizing import Execution
from .sweep.store_file import DB_NAME

if TYPE_CHECKING:
    import pandas as pd

    from .sweep.stream import Listener, SweepSummary

# The trial store and the sweep (Optuna, SQLAlchemy, pandas) load where they are used, so that `mua transfer` on a
# fitted run reads fit.json without them; `from mua_cli.api import Listener` still works (__getattr__).
_LATER = {"Listener": ".sweep.stream", "SweepSummary": ".sweep.stream"}


def __getattr__(name: str):
    if name not in _LATER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LATER[name], __package__), name)
    globals()[name] = value
    return value


def load_trials(run_dir: str | Path, storage: str | None = None, study: str | None = None) -> pd.DataFrame:
    """Every stored trial of a run, one row a trial, read without writing to the store (`attrs["info"]`: what the
    sweep recorded about the run besides its trials). `storage`, `study`: the trials live there."""
    from .sweep.store import load_trials as load

    return load(Path(run_dir), storage, study)


FULL_CHECK = "full-check"  # a run folder's subfolder: its sweep's full-finetuning check (--full-check)

__all__ = [
    "Execution", "FitResult", "Listener", "MuaError", "Prediction", "Recipe", "SweepSummary",
    "apply_regime", "export_trials", "fit", "fit_run", "full_check_fit", "has_trials", "load_recipe", "load_trials",
    "lora_config", "predict", "preview_sweep", "refit", "resolve_device", "run_sweep", "start_process_server", "work",
]  # fmt: skip


def start_process_server() -> None:
    """Starts the server the CPU's slot processes fork from, before this process imports torch (sweep/forkserver.py):
    the two import side by side. Harmless where none is used."""
    from .sweep.forkserver import start_process_server as start

    start()


def resolve_device(device: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against what this machine has (one line where it lacks it).
    A GPU's CUDA starts beside the imports that checking it needs (accel/cuda_start.py)."""
    from .accel.cuda_start import start_cuda

    start_cuda(device)
    from .sweep.trainer import resolve_device as resolve

    return resolve(device)


def has_trials(run_dir: str | Path) -> bool:
    """Whether the run folder's store holds a trial (read only; a folder without a store has none)."""
    from .sweep.store import TrialStore

    return bool(TrialStore.open(Path(run_dir)).trials())


def work(run_dir: str | Path, storage: str | None, study: str, device: str, listener: Listener | None = None,
         execution: Execution | None = None, wait_s: float = 0.0):  # fmt: skip
    """`mua worker`: runs a shared study's queued trials until its sweep is done (sweep/worker.py); the summary
    says how many it ran. `run_dir`: the run folder whose trials.db holds the study, where no `storage`."""
    from .sweep.stream import Listener
    from .sweep.worker import join

    return join(Path(run_dir), storage, study, device, listener or Listener(), execution, wait_s)


def preview_sweep(recipe: Recipe, run_dir: str | Path, device: str = "cpu", storage: str | None = None,
                  study: str | None = None, full_check: bool = False):  # fmt: skip
    """`mua sweep --dry-run`: every check a sweep makes before its first trial, and its plan (trials, memory per
    slot, time), with nothing trained or written (sweep/preview.py); `full_check`: the check's plan too."""
    from .spec.data_identity import no_cache_writes
    from .sweep.plan import expected_total
    from .sweep.preview import preview

    if full_check:
        _can_check(recipe, storage, study)
    with no_cache_writes():
        p = preview(recipe, Path(run_dir), device, storage=storage, study=study)
    if full_check:
        check = recipe.full_check()
        p.full_check = {"run_dir": str(Path(run_dir) / FULL_CHECK), "steps": check.optim.steps,
                        "expected": expected_total(check)}  # fmt: skip
    return p


def save_text(path: Path, text: str, on_note: Callable[[str], None] | None = None) -> bool:
    """Writes `text` to `path` whole or not at all (atomic.py: a temporary file of its own, then renamed). False,
    with a note, where the folder takes no writes (read-only, full): what fit and transfer cache there is not needed
    to answer."""
    try:
        write_atomic(path, text)
        return True
    except OSError as e:
        if on_note:
            on_note(f"{path.name} not saved: cannot write in {path.parent} ({e.strerror or e})")
        return False


def run_sweep(
    recipe: Recipe,
    run_dir: str | Path,
    device: str = "auto",
    listener: Listener | None = None,
    storage: str | None = None,
    execution: Execution | None = None,
    retry_failed: bool = True,
    study: str | None = None,
    full_check: bool = False,
) -> SweepSummary:
    """Runs `recipe`'s sweep into `run_dir` (its trial store; resumes what it holds) and says what it ran.
    `device`: "auto" (as `mua sweep`: every visible GPU, else the CPU), "cpu", "cuda" or "cuda:N". `listener`
    hears its progress (sweep.stream.Listener); `storage`, `study`: an Optuna storage URL and a shared study
    (docs/scale-out.md); `execution`: slots and trials per pass (0: chosen by size). `full_check`: then sweep
    full finetuning alone at a quarter of the steps into run_dir/full-check (`Recipe.full_check`), which
    `predict` shows beside a full-finetuning prediction (the summary's `check`)."""
    from .sweep.stream import Listener
    from .sweep.stream import run_sweep as _run_sweep

    if full_check:
        _can_check(recipe, storage, study)
    dev = resolve_device(device)
    if execution is not None and execution.device != dev:
        execution = dataclasses.replace(execution, device=dev)
    summary = _run_sweep(recipe, Path(run_dir), dev, listener, storage, execution, retry_failed, study)
    if full_check:
        check = recipe.full_check()
        (listener or Listener()).note(f"full-finetuning check: full finetuning alone, {check.optim.steps} steps a "
                                      f"trial, into {Path(run_dir) / FULL_CHECK}")  # fmt: skip
        summary.check = _run_sweep(check, Path(run_dir) / FULL_CHECK, dev, listener, None, execution, retry_failed)
        summary.full_check_offer = ""
    return summary


def _can_check(recipe: Recipe, storage: str | None, study: str | None) -> None:
    if storage is not None or study is not None:
        raise MuaError("--full-check runs in a local run folder; it does not combine with --storage or --study")
    if recipe.wants_full:
        raise MuaError("--full-check is for sweeps without full finetuning; this one measures it (--ranks ...,full)")


def full_check_fit(run_dir: str | Path, on_note: Callable[[str], None] | None = None) -> FitResult | None:
    """The fit of a run's full-finetuning check (`run_sweep(..., full_check=True)`), or None where it has none."""
    folder = Path(run_dir) / FULL_CHECK
    if not (folder / DB_NAME).is_file() or not has_trials(folder):
        return None
    return fit(folder, fresh=False, on_note=on_note)


def fit(
    run_dir: str | Path,
    fresh: bool = True,
    on_note: Callable[[str], None] | None = None,
    storage: str | None = None,
    study: str | None = None,
) -> FitResult:
    """The run's fit. `fresh`: fitted from the trials (and saved as fit.json where the folder takes writes);
    else fit.json when it is newer than the trial store. A fit.json that cannot be read back (truncated,
    hand-edited, another schema) is no reason to stop: the trials are the truth, so the run is fitted again.
    `storage`, `study`: the trials live there (a shared study is always fitted fresh: others may add to it)."""
    run_dir = Path(run_dir)
    path, db = run_dir / "fit.json", run_dir / DB_NAME
    fresh = fresh or storage is not None or study is not None
    if not fresh and path.is_file() and (not db.is_file() or path.stat().st_mtime >= db.stat().st_mtime):
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise MuaError("fit.json is not a JSON object")
            return FitResult.from_dict(doc)
        except (MuaError, ValueError, OSError):
            pass
    return refit(run_dir, on_note, storage, study)[0]


def refit(
    run_dir: str | Path,
    on_note: Callable[[str], None] | None = None,
    storage: str | None = None,
    study: str | None = None,
) -> tuple[FitResult, bool]:
    """A fresh fit of the run's trials, and whether it could be saved as fit.json (the store is only read)."""
    run_dir = Path(run_dir)
    trials = load_trials(run_dir, storage, study)
    result = fit_run(trials)
    limit = trials.attrs.get("info", {}).get("max_lora_rank")
    if limit:  # recorded by the sweep (older runs lack it): a target rank is checked against it
        result.settings["max_lora_rank"] = int(limit)
    if storage is not None or study is not None:  # a shared study's fit goes to runs/<study>, made once it is fitted
        with suppress(OSError):
            run_dir.mkdir(parents=True, exist_ok=True)
    return result, save_text(run_dir / "fit.json", json.dumps(result.to_dict(), indent=2, allow_nan=False), on_note)


def is_full_target(to: str | int) -> bool:
    """Whether `--to` names full finetuning ("full-ft", or "full")."""
    return str(to).strip().lower() in (FULL_TARGET, "full")


def predict(
    result: FitResult,
    to: str | int,
    regime: str | None = None,
    basis: str = "auto",
    calibration: FitResult | None = None,
    heuristic: bool = False,
    check: FitResult | None = None,
) -> Prediction:
    """The learning rate for `to`: "full-ft" or a LoRA rank, in `regime` (default B:1 where it was swept).
    `calibration`: a proxy run's fit whose measured full-finetuning offset replaces the study's. `check`: the
    run's full-finetuning check (`full_check_fit`), shown beside a full-finetuning prediction."""
    if basis not in CHOICES:
        raise MuaError(f"unknown --basis {basis!r}; choose from {', '.join(CHOICES)}")
    target = str(to).strip().lower()
    if is_full_target(target):
        if regime is not None and get_regime(regime).name != TRANSFER_REGIME:  # get_regime: one line if unknown
            raise MuaError(f"--regime applies to a rank target; full finetuning is predicted from {TRANSFER_REGIME}")
        return predict_full(result, heuristic=heuristic, basis=basis, calibration=calibration, check=check)
    if calibration is not None:
        raise MuaError("--calibrate applies to --to full-ft only")
    try:
        rank = int(target)
    except ValueError:
        raise MuaError(f"--to takes 'full-ft' or a positive rank, not {to!r}") from None
    if not 1 <= rank <= MAX_RANK:
        raise MuaError(f"--to takes a rank from 1 to {MAX_RANK}, not {rank}")
    swept = sorted(result.regimes)
    name = regime or (TRANSFER_REGIME if TRANSFER_REGIME in swept else next(iter(swept), None))
    if name is None:
        raise MuaError("the run has no LoRA trials to predict from")
    return predict_rank(result, name, rank, basis=basis)


TRIAL_FORMATS = ("csv", "json")


def export_trials(run_dir: str | Path, fmt: str = "csv", storage: str | None = None, study: str | None = None) -> str:
    """A run's trials as CSV or JSON text, one row (object) a trial, as `optuna trials -f json` exports a study:
    the trial's number, regime, rank, lr, seed, status, metric, and what the store keeps of it (its key, loss
    curve, held-out loss, peft settings, wall time). JSON: a non-finite metric (a diverged trial's) is null; CSV:
    lists and mappings are JSON text in their cell."""
    import math

    if fmt not in TRIAL_FORMATS:
        raise MuaError(f"unknown --format {fmt!r}; choose from {', '.join(TRIAL_FORMATS)}")
    df = load_trials(Path(run_dir), storage, study)

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v.item() if hasattr(v, "item") and not isinstance(v, str | bytes) else v

    rows = [{k: clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    if fmt == "json":
        return json.dumps(rows, indent=1, allow_nan=False)
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(df.columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()})
    return out.getvalue()


def lora_config(regime: str, rank: int, targets: str | list[str] = "all-linear", alpha0: float = 1.0, **peft_kwargs):
    """peft's `LoraConfig` for a μA `regime` at `rank`: the sweep's own (lora_alpha and use_rslora realise the
    regime's α; dropout 0; targets as swept). `peft_kwargs` (task_type, modules_to_save, ...) pass through.
    Build the model with `get_peft_model(model, config)`, then `apply_regime(model, regime)`."""
    from .train.adapters import lora_config as sweep_config

    config = sweep_config(get_regime(regime), rank, alpha0, targets)
    for k, v in peft_kwargs.items():
        setattr(config, k, v)
    return config


def apply_regime(peft_model, regime: str, seed: int = 0, alpha0: float = 1.0, adapter: str = "default") -> int:
    """Sets a μA regime's initialization on a peft LoRA model, in place, as mua's sweep does: Init[A] draws
    A ~ N(0, 1/n_in) and zeroes B; Init[B] zeroes A and draws B ~ N(0, 1/r) (peft has no Init[B]). Call it after
    `get_peft_model` and before the optimizer is built. `seed` picks the draws (the same seed on the same model
    gives the same tensors as the sweep's trial of that seed). Returns the number of adapted layers.

    The model's LoRA scaling must be the regime's α (with `alpha0`, the recipe's α0): `B:1` needs
    `lora_alpha = r`, `A:r` `lora_alpha = 1` (× α0); `lora_config(regime, rank)` builds one that is. A model whose
    scaling differs, or that has no LoRA layer for `adapter`, is a MuaError: the LR mua found holds for the
    regime's α, not another."""
    from .train.adapters import init_lora, regime_scaling_errors

    reg = get_regime(regime)
    wrong = regime_scaling_errors(peft_model, reg, alpha0, adapter)
    if wrong:
        name, r, have, want = wrong[0]
        peft = reg.peft_args(alpha0, r)
        raise MuaError(
            f"{len(wrong)} LoRA layer(s) scale by another α than {reg.name}'s (first: {name}, rank {r}: "
            f"{have:g} where {reg.name} needs {want:g}); build the model with LoraConfig(r={r}, "
            f"lora_alpha={peft['lora_alpha']:g}, use_rslora={peft['use_rslora']}), e.g. mua_cli.api.lora_config"
        )
    n = init_lora(peft_model, reg, None, seed, adapter)
    if n == 0:
        raise MuaError(
            f"the model has no LoRA layer with adapter {adapter!r}; wrap it with peft's get_peft_model first"
        )
    return n
