"""Running a sweep: the planned trials, then more where grid.py says so, until nothing is added; resuming:
finished trials (found by key in the store) are never run or stored twice."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..atomic import write_atomic
from ..errors import MuaError
from ..science.optimum import seed_adjusted
from ..science.theory import FULL, lr_label, parse_lrs
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from ..train.shapes import rank_limit
from .execute import Execution, executor
from .grid import extension, fill, grid_plan, groups, make_spec, plan, refinement
from .store import TrialStore, frame
from .trackers import Reporting, open_trackers


class Listener:
    """What a sweep reports while it runs; the CLI renders it. Every method is optional."""

    def note(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def grow(self, added: int) -> None: ...
    def trial_start(self, spec: TrialSpec) -> None: ...
    def step(self, step: int, loss: float) -> None: ...
    def trial_done(self, spec: TrialSpec, result: TrialResult) -> None: ...


@dataclass
class SweepSummary:
    run_dir: Path
    ran: int = 0
    skipped: int = 0
    retried: int = 0  # failed trials (errors, not divergences) run again
    added: list[str] = field(default_factory=list)  # one line per grid extension
    at_edge: list[str] = field(default_factory=list)  # groups still at an edge after max_extend
    device: str = "cpu"


def run_sweep(
    recipe: Recipe,
    run_dir: Path,
    device: str = "cpu",
    listener: Listener | None = None,
    storage: str | None = None,
    execution: Execution | None = None,
    retry_failed: bool = True,
    study: str | None = None,
) -> SweepSummary:
    """Runs the recipe's sweep into `run_dir`'s store (or `storage`), resuming what it holds. `study`: plan into
    that shared study instead, and work on it beside any `mua worker` (worker.py)."""
    listener = listener or Listener()
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    limit = rank_limit(recipe)  # before anything is stored: a rank past the model's layers is a bad input
    with contextlib.ExitStack() as stack:
        if study is None:  # a second sweep of this folder waits for the first (store made), then skips what it stored
            _make_folder(run_dir)
            stack.enter_context(folder_lock(run_dir, listener))
        try:
            store = TrialStore(run_dir, storage, study=study)
            if trackers := open_trackers(recipe.sweep.report_to, run_dir, store.name):
                listener = Reporting(listener, trackers, recipe)
        except MuaError:
            if fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return _locked(recipe, run_dir, store, fresh, limit, device, listener, execution, retry_failed, study)


def _make_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise MuaError(f"run folder {run_dir} is a file; name a folder with --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MuaError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None


def _locked(recipe, run_dir, store, fresh, limit, device, listener, execution, retry_failed, study) -> SweepSummary:
    try:
        _pin_recipe(run_dir, recipe)
        _pin_study(store, recipe)
        done = store.keys(final_only=retry_failed)  # read before any write: a store that does not parse stays
        if limit is not None:
            store.set_info(max_lora_rank=limit)  # for `mua transfer --to RANK`
        if study is not None:
            from .worker import plan_and_work

            return plan_and_work(recipe, store, done, device, listener, execution, SweepSummary(run_dir))
        return _sweep(recipe, store, done, device, listener, execution, fresh)
    except MuaError:
        if fresh and not store.keys():  # a folder that could not be set up would pass for the latest run
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _sweep(recipe, store, done, device, listener, execution, fresh) -> SweepSummary:
    run_dir = store.run_dir
    summary = SweepSummary(run_dir=run_dir, device=device)
    pending = [s for s in plan(recipe) if s.key not in done]
    wanted = set(groups(recipe))
    # every finished trial of the swept groups, whichever round would have asked for it: none runs again
    summary.skipped = sum(t.user_attrs["key"] in done and (t.params["regime"], int(t.params["rank"])) in wanted
                          for t in store.trials())  # fmt: skip
    summary.retried = len({s.key for s in pending} & store.keys())
    if summary.retried:
        listener.note(f"retrying {summary.retried} failed trial(s) (--no-retry-failed keeps them as they are)")
    listener.start(total=len(plan(recipe)), done=len(plan(recipe)) - len(pending))
    if summary.skipped:
        listener.note(f"resuming: {summary.skipped} finished trial(s) found in {run_dir}, not run again")
    ex = dataclasses.replace(execution or Execution(), device=device)
    try:
        # the CPU's slots depend on how long the sweep is: the grid not yet run measures it, as the first round
        # (every other LR) would not
        expected = max(len(pending), sum(s.key not in done for s in grid_plan(recipe))) if pending else 0
        runner = executor(recipe, ex, listener, expected)  # torch and the model load only here, when trials run
    except BaseException:
        if fresh and not store.keys():  # an empty folder would pass for the latest run with `mua fit`
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        _rounds(recipe, store, runner, pending, done, summary, listener)
    except BaseException:
        runner.close(interrupted=True)
        raise
    runner.close()
    return summary


@contextlib.contextmanager
def folder_lock(run_dir: Path, listener: Listener):
    """This process alone sweeps `run_dir` while it holds the lock (flock on the folder itself: no lock file to
    leave behind); the OS frees it if the process dies."""
    import fcntl

    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise MuaError(f"cannot lock the run folder {run_dir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            listener.note(f"another `mua sweep` is running in {run_dir}: waiting for it to finish, then resuming")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pin_study(store: TrialStore, recipe: Recipe) -> None:
    """One study, one set of outcome-changing settings, whatever shares its storage."""
    where = f"study {store.name!r}" if store.shared else f"the trial store of {store.run_dir}"
    wrong = recipe.pin_mismatch(store.info(), where)
    if wrong:
        raise MuaError(wrong.replace("--out folder", "--study") if store.shared else wrong)
    store.set_info(**recipe.pin())


def _rounds(recipe, store, runner, pending, done, summary, listener) -> None:
    """Run the pending trials, then the next round's (next_round), until nothing is added."""
    while True:
        for spec, result in runner.run(pending):
            store.add(spec, result, meta(recipe, spec))
            done.add(spec.key)
            summary.ran += 1
            listener.trial_done(spec, result)
        pending = next_round(recipe, store, done, summary, listener)
        if not pending:
            return
        listener.grow(len(pending))


def next_round(recipe, store, done, summary, listener) -> list[TrialSpec]:
    """From everything stored: per group, the grid's LRs the fit reads around its best (grid.fill), else one
    more LR where its optimum sits at the grid's edge; once no group needs either, refinements around each
    optimum (REFINERS). Every decision is a function of the stored trials alone, so a finished sweep resumed
    adds nothing; `done`: keys not to add again."""
    base_grid = parse_lrs(recipe.sweep.lrs)
    pending: list[TrialSpec] = []
    metrics = _group_metrics(store)
    summary.at_edge = []
    filled = 0
    for reg, rank in groups(recipe):
        specs = [
            make_spec(recipe, reg, rank, lr, s)
            for lr in fill(metrics.get((reg, rank), {}), base_grid, bool(recipe.sweep.refine))
            for s in range(recipe.sweep.seeds)
        ]
        specs = [s for s in specs if s.key not in done]
        if specs:
            filled += len(specs)
            pending.extend(specs)
            continue
        new, why = extension(metrics.get((reg, rank), {}), base_grid, recipe.sweep.max_extend)
        name = "full-ft" if reg == FULL else f"{reg} r={rank}"
        if new is None:
            if why.startswith("still"):
                summary.at_edge.append(f"{name}: {why}")
            continue
        specs = [make_spec(recipe, reg, rank, new, s) for s in range(recipe.sweep.seeds)]
        specs = [s for s in specs if s.key not in done]
        if specs:
            line = f"{name}: best at the {why} edge of the grid, added lr={lr_label(new)}"
            summary.added.append(line)
            listener.note(line)
            pending.extend(specs)
    if filled:
        line = f"filling in: {filled} trial(s) at the grid's LRs the fit reads around each best LR"
        summary.added.append(line)
        listener.note(line)
    for refine in REFINERS if recipe.sweep.refine else ():
        if pending:
            break
        pending = refine(recipe, store, metrics, done, summary, listener)
    return pending


def _refinements(recipe, store, metrics, done, summary, listener) -> list[TrialSpec]:
    pending = []
    for reg, rank in groups(recipe):
        for lr in refinement(metrics.get((reg, rank), {})):
            specs = [make_spec(recipe, reg, rank, lr, s) for s in range(recipe.sweep.seeds)]
            pending.extend(s for s in specs if s.key not in done)
    return _announce(pending, "at half-octave LRs around each interior optimum", summary, listener)


WIDE_LOG2 = 1.0  # an η* interval wider than a factor 2 gets one more seed near it
EXTRA_LRS = 2  # the LRs nearest η* it runs at (what 2 and 3 gave: benchmarks/default_plan.json)


def _extra_seeds(recipe, store, metrics, done, summary, listener) -> list[TrialSpec]:
    """One more seed at the EXTRA_LRS LRs nearest η* wherever η*'s interval is still wider than a factor 2.

    A flat or noisy curve is where another seed pays: the local fit's interval narrows with every point near
    the optimum, and nowhere else does a trial buy as much."""
    from ..science.rank_optima import estimate  # the science's estimator, loaded only when a sweep refines

    df = frame(store)
    wanted = set(groups(recipe))
    parts = [g for key, g in df.groupby(["regime", "rank"]) if key in wanted] if not df.empty else []
    pending = []
    has_extra = (
        set() if df.empty else set(map(tuple, df.loc[df["seed"] >= recipe.sweep.seeds, ["regime", "rank"]].values))
    )
    for o in estimate(parts)[0] if parts else []:
        if not o.usable or math.log2(o.hi / o.lo) <= WIDE_LOG2 or (o.regime, o.rank) in has_extra:
            continue  # located well enough, or given its extra seed already (once per group, ever)
        near = sorted((p["lr"] for p in o.points), key=lambda lr: abs(math.log2(lr) - o.log2_lr_star))[:EXTRA_LRS]
        specs = [make_spec(recipe, o.regime, o.rank, lr, recipe.sweep.seeds) for lr in near]
        pending.extend(s for s in specs if s.key not in done)
    return _announce(pending, "of one more seed near each optimum whose interval is wider than 2×", summary, listener)


def _announce(pending: list[TrialSpec], what: str, summary: SweepSummary, listener: Listener) -> list[TrialSpec]:
    if pending:
        line = f"refining: {len(pending)} trial(s) {what}"
        summary.added.append(line)
        listener.note(line)
    return pending


REFINERS = (_refinements, _extra_seeds)


def _group_metrics(store: TrialStore) -> dict[tuple[str, int], dict[float, list[float]]]:
    """Per (regime, rank), LR → metrics (inf when diverged), each seed's curve moved onto one level first
    (optimum.seed_adjusted), so that a seed run at a few LRs only does not move their means."""
    raw: dict = defaultdict(list)
    for t in store.trials():
        a = t.user_attrs
        if a.get("status") == "failed":
            continue
        value = math.inf if a.get("status") == "diverged" else float(a["metric"])
        raw[(t.params["regime"], int(t.params["rank"]))].append((float(t.params["lr"]), value, int(t.params["seed"])))
    out: dict = {}
    for group, rows in raw.items():
        lr, y, seed = (np.array(c) for c in zip(*rows, strict=True))
        fin = np.isfinite(y)
        y[fin] = seed_adjusted(np.log2(lr[fin]), y[fin], seed[fin])
        per: dict = defaultdict(list)
        for a, b in zip(lr, y, strict=True):
            per[float(a)].append(float(b))
        out[group] = per
    return out


def meta(recipe: Recipe, spec: TrialSpec) -> dict:
    """What is stored with a trial besides its result: its LoRA settings and the recipe it ran."""
    return {
        **spec.lora_settings(recipe.optim.alpha0),
        "steps": recipe.optim.steps,
        "batch_size": recipe.optim.batch_size,
        "seq_len": recipe.data.seq_len,
        "fingerprint": recipe.fingerprint(),
        "recipe": recipe.outcome_fields(),
    }


def _pin_recipe(run_dir: Path, recipe: Recipe) -> None:
    """One run folder, one set of outcome-changing settings: a changed `--steps` needs a new folder."""
    path = run_dir / "recipe.yaml"
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        wrong = recipe.pin_mismatch(old if isinstance(old, dict) else {}, str(run_dir))
        if wrong:
            raise MuaError(wrong)
    text = yaml.safe_dump({**recipe.pin(), **recipe.to_dict()}, sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return  # nothing to write: a full disk or a read-only folder cannot cost the resumed run its recipe
    try:
        write_atomic(path, text)
    except OSError as e:
        raise MuaError(f"cannot write {path}: {e.strerror or e}") from None
