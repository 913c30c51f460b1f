"""Planning the LR grid, running the trials, growing the grid until every optimum is interior,
and resuming: finished trials (found by key in the store) are never run or stored twice."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import MuaError
from ..science.optimum import seed_adjusted
from ..science.theory import FULL, lr_label, parse_lrs, parse_regimes
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from ..train.shapes import rank_limit
from .execute import Execution, executor
from .store import TrialStore, frame

GROW_FACTOR = 2.0  # grids are powers of 2; an extension adds the next power beyond the edge


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


def trial_key(recipe: Recipe, regime: str, rank: int, lr: float, seed: int) -> str:
    blob = json.dumps(
        {"recipe": recipe.outcome_fields(), "regime": regime, "rank": rank, "lr": f"{lr:.12g}", "seed": seed},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def make_spec(recipe: Recipe, regime: str, rank: int, lr: float, seed: int) -> TrialSpec:
    return TrialSpec(regime, rank, lr, seed, trial_key(recipe, regime, rank, lr, seed))


def groups(recipe: Recipe) -> list[tuple[str, int]]:
    """The (regime, rank) pairs the sweep covers; full finetuning is the pair ("full", 0)."""
    out = [(reg.name, r) for reg in parse_regimes(recipe.regimes) for r in recipe.lora_ranks]
    if recipe.wants_full:
        out.append((FULL, 0))
    return out


def plan(recipe: Recipe) -> list[TrialSpec]:
    lrs = parse_lrs(recipe.lrs)
    return [
        make_spec(recipe, reg, rank, lr, seed)
        for reg, rank in groups(recipe)
        for lr in lrs
        for seed in range(recipe.seeds)
    ]


def extension(
    lrs_metrics: dict[float, list[float]], base_grid: list[float], max_extend: int
) -> tuple[float | None, str]:
    """The next LR to add for one (regime, rank), or None with the reason there is none.

    Diverged trials count as +inf: they bound the optimum from above. The number of extensions
    so far is read off the grid itself, so a resumed sweep continues where it stopped.
    """
    means = {lr: sum(v) / len(v) for lr, v in lrs_metrics.items() if v}
    if len(means) < 2:
        return None, "no finished trials"
    grid = sorted(means)
    extended = sum(1 for lr in grid if lr < min(base_grid) * 0.999 or lr > max(base_grid) * 1.001)
    finite = [lr for lr in grid if math.isfinite(means[lr])]
    if not finite:
        edge, new = "low", grid[0] / GROW_FACTOR  # everything diverged: look lower
    else:
        best = min(finite, key=lambda lr: means[lr])
        if best == grid[0]:
            edge, new = "low", grid[0] / GROW_FACTOR
        elif best == grid[-1]:
            edge, new = "high", grid[-1] * GROW_FACTOR
        else:
            return None, "interior"
    if extended >= max_extend:
        return None, f"still best at the {edge} edge after {extended} extension(s)"
    return new, edge


def run_sweep(
    recipe: Recipe,
    run_dir: Path,
    device: str = "cpu",
    listener: Listener | None = None,
    storage: str | None = None,
    execution: Execution | None = None,
    retry_failed: bool = True,
) -> SweepSummary:
    listener = listener or Listener()
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    limit = rank_limit(recipe)  # before anything is stored: a rank past the model's layers is a bad input
    store = TrialStore(run_dir, storage)
    try:
        _pin_recipe(run_dir, recipe)
        done = store.keys(final_only=retry_failed)  # read before any write: a store that does not parse stays as is
        if limit is not None:
            store.set_info(max_lora_rank=limit)  # for `mua transfer --to RANK`
    except MuaError:
        if fresh:  # a folder that could not be set up would pass for the latest run with `mua fit`
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    summary = SweepSummary(run_dir=run_dir, device=device)
    pending = [s for s in plan(recipe) if s.key not in done]
    summary.skipped = len(plan(recipe)) - len(pending)
    summary.retried = len({s.key for s in pending} & store.keys())
    if summary.retried:
        listener.note(f"retrying {summary.retried} failed trial(s) (--no-retry-failed keeps them as they are)")
    listener.start(total=len(plan(recipe)), done=summary.skipped)
    if summary.skipped:
        listener.note(f"resuming: {summary.skipped} finished trial(s) found in {run_dir}, skipped")
    ex = dataclasses.replace(execution or Execution(), device=device)
    try:
        runner = executor(recipe, ex, listener, len(pending))  # torch and the model load only here, when trials run
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


def _rounds(recipe, store, runner, pending, done, summary, listener) -> None:
    """Run the pending trials; then, from everything stored, extend the grid where an optimum sits at an edge,
    else refine around each optimum (REFINERS); again until nothing is added. Every decision is a function of
    the stored trials alone, so a finished sweep resumed adds nothing."""
    base_grid = parse_lrs(recipe.lrs)
    while True:
        for spec, result in runner.run(pending):
            store.add(spec, result, _meta(recipe, spec, result))
            done.add(spec.key)
            summary.ran += 1
            listener.trial_done(spec, result)
        pending = []
        metrics = _group_metrics(store)
        summary.at_edge = []
        for reg, rank in groups(recipe):
            new, why = extension(metrics.get((reg, rank), {}), base_grid, recipe.max_extend)
            name = "full-ft" if reg == FULL else f"{reg} r={rank}"
            if new is None:
                if why.startswith("still"):
                    summary.at_edge.append(f"{name}: {why}")
                continue
            specs = [make_spec(recipe, reg, rank, new, s) for s in range(recipe.seeds)]
            specs = [s for s in specs if s.key not in done]
            if specs:
                line = f"{name}: best at the {why} edge of the grid, added lr={lr_label(new)}"
                summary.added.append(line)
                listener.note(line)
                pending.extend(specs)
        for refine in REFINERS if recipe.refine else ():
            if pending:
                break
            pending = refine(recipe, store, metrics, done, summary, listener)
        if not pending:
            return
        listener.grow(len(pending))


def refinement(lrs_metrics: dict[float, list[float]]) -> list[float]:
    """Half-octave LRs either side of an interior best grid point that the grid lacks there.

    A power-of-2 grid puts one point per octave near the optimum; the local fit (optimum.py) needs a few more
    to estimate the curvature on both sides and the noise, and they cost two LRs per group."""
    means = {lr: sum(v) / len(v) for lr, v in lrs_metrics.items() if v}
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    if len(finite) < 3:
        return []
    grid = sorted(means)
    best = min(finite, key=finite.get)
    if best in (grid[0], grid[-1]):
        return []
    out = []
    for new in (best * 2**-0.5, best * 2**0.5):
        if all(abs(math.log2(new / lr)) > 0.3 for lr in grid):
            out.append(new)
    return out


def _refinements(recipe, store, metrics, done, summary, listener) -> list[TrialSpec]:
    pending = []
    for reg, rank in groups(recipe):
        for lr in refinement(metrics.get((reg, rank), {})):
            specs = [make_spec(recipe, reg, rank, lr, s) for s in range(recipe.seeds)]
            pending.extend(s for s in specs if s.key not in done)
    return _announce(pending, "at half-octave LRs around each interior optimum", summary, listener)


WIDE_LOG2 = 1.0  # an η* interval wider than a factor 2 gets one more seed near it


def _extra_seeds(recipe, store, metrics, done, summary, listener) -> list[TrialSpec]:
    """One more seed at the three LRs nearest η* wherever η*'s interval is still wider than a factor 2.

    A flat or noisy curve is where another seed pays: the local fit's interval narrows with every point near
    the optimum, and nowhere else does a trial buy as much."""
    from ..science.rank_optima import estimate  # the science's estimator, loaded only when a sweep refines

    df = frame(store)
    wanted = set(groups(recipe))
    parts = [g for key, g in df.groupby(["regime", "rank"]) if key in wanted] if not df.empty else []
    pending = []
    has_extra = set() if df.empty else set(map(tuple, df.loc[df["seed"] >= recipe.seeds, ["regime", "rank"]].values))
    for o in estimate(parts)[0] if parts else []:
        if not o.usable or math.log2(o.hi / o.lo) <= WIDE_LOG2 or (o.regime, o.rank) in has_extra:
            continue  # located well enough, or given its extra seed already (once per group, ever)
        near = sorted((p["lr"] for p in o.points), key=lambda lr: abs(math.log2(lr) - o.log2_lr_star))[:3]
        specs = [make_spec(recipe, o.regime, o.rank, lr, recipe.seeds) for lr in near]
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


def _meta(recipe: Recipe, spec: TrialSpec, result: TrialResult) -> dict:
    return {
        **spec.lora_settings(recipe.alpha0),
        "steps": recipe.steps,
        "batch_size": recipe.batch_size,
        "seq_len": recipe.seq_len,
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
        if old.get("fingerprint") and old["fingerprint"] != recipe.fingerprint():
            raise MuaError(
                f"{run_dir} was swept with other settings (steps, batch, model, data...); "
                "use a new --out folder, or the same settings to resume"
            )
    text = yaml.safe_dump({"fingerprint": recipe.fingerprint(), **recipe.to_dict()}, sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return  # nothing to write: a full disk or a read-only folder cannot cost the resumed run its recipe
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MuaError(f"cannot write {path}: {e.strerror or e}") from None
