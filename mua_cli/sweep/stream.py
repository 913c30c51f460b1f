"""A sweep: the planned trials as one stream. The slots never wait for a round: each (regime, rank) group's next
trials (plan.py) are queued the moment the group's own trials are in, while the other groups' run; only the
extra seeds, a decision over every group, wait for the sweep to settle. Resuming: finished trials (found by key
in the store) are never run or stored twice, and a finished sweep resumed adds nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..atomic import write_atomic
from ..errors import MuaError
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from ..train.shapes import rank_limit
from .grid import grid_plan, plan
from .plan import Planner, expected_total, meta, stored_trial
from .sizing import FULL_WORK, Execution
from .store import TrialStore, frame
from .trackers import Reporting, open_trackers


class Listener:
    """What a sweep reports while it runs; the CLI renders it. Every method is optional; all are called from the
    thread that called run_sweep.

    note(message)           a line for the person: a decision, a setting chosen, a retry
    start(total, done)      the first round: `total` trials planned, `done` of them already stored
    expected(n)             the best guess at the trials the whole sweep ends with (plan.expected_total at the
                            start, then planned + what each group is likely to add); an ETA's denominator
    grow(added)             `added` more trials planned (a group's fill, extension, refinements or extra seeds)
    trial_start(spec)       one slot in this thread starts a unit (its first trial)
    step(step, loss)        that slot's unit, each step (a pool's slots report `loss` instead)
    loss(spec, step, loss)  a pool's running unit (its first trial), every pool.LOSS_EVERY steps
    trial_done(spec, result)  one trial finished and stored
    """

    def note(self, message: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def expected(self, n: int) -> None: ...
    def grow(self, added: int) -> None: ...
    def trial_start(self, spec: TrialSpec) -> None: ...
    def step(self, step: int, loss: float) -> None: ...
    def loss(self, spec: TrialSpec, step: int, loss: float) -> None: ...
    def trial_done(self, spec: TrialSpec, result: TrialResult) -> None: ...


@dataclass
class SweepSummary:
    run_dir: Path
    ran: int = 0
    skipped: int = 0
    retried: int = 0  # failed trials (errors, not divergences) run again
    added: list[str] = field(default_factory=list)  # one line per grid extension, fill or refinement
    at_edge: list[str] = field(default_factory=list)  # groups still at an edge after max_extend
    device: str = "cpu"
    full_check_offer: str = ""  # where a full-finetuning check is cheap and fits: the line that offers it
    check: SweepSummary | None = None  # `--full-check`'s own sweep (run_dir/full-check), where it ran


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
    try:
        fresh = not run_dir.exists()
    except OSError as e:  # a name too long for the file system, say
        raise MuaError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None
    limit = rank_limit(recipe)  # before anything is stored: a rank past the model's layers is a bad input
    ex = dataclasses.replace(execution or Execution(), device=device)
    with contextlib.ExitStack() as stack:
        if study is None:  # a second sweep of this folder waits for the first (store made), then skips what it stored
            _make_folder(run_dir)
            stack.enter_context(folder_lock(run_dir, listener))
        try:
            if study is None:
                store = TrialStore.create(run_dir, storage)
            else:
                from .shared import SharedStudy

                store = SharedStudy.create(run_dir, storage, study)
            if trackers := open_trackers(recipe.sweep.report_to, run_dir, store.name):
                listener = Reporting(listener, trackers, recipe)
        except MuaError:
            if fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        try:
            _refuse_other_settings(run_dir, store, recipe)  # before either pin is written: a refusal writes nothing
            _pin_recipe(run_dir, recipe)
            _pin_study(store, recipe)
            done = store.keys(final_only=retry_failed)  # read before any write: a store that does not parse stays
            if limit is not None:
                store.set_info(max_lora_rank=limit)  # for `mua transfer --to RANK`
            sweep = Sweep(recipe, store, done, SweepSummary(run_dir, device=device), listener, ex)
            if study is not None:
                from .worker import plan_and_work

                return plan_and_work(sweep)
            return sweep.run(fresh)
        except MuaError:
            if fresh and not store.keys():  # a folder that could not be set up would pass for the latest run
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


class Sweep:
    """One sweep's state: its recipe, store, the keys done, its summary and listener, and how it runs."""

    def __init__(self, recipe: Recipe, store: TrialStore, done: set[str], summary: SweepSummary, listener: Listener,
                 execution: Execution):  # fmt: skip
        self.recipe, self.store, self.done, self.summary = recipe, store, done, summary
        self.listener, self.execution = listener, execution
        self.planner = Planner(recipe, done, listener.note)
        self.waiting: Counter = Counter()  # per group, its trials queued or running
        self.wanted: set[str] = set()  # keys queued for the store (not those riding along)
        self.spare: dict[str, TrialResult] = {}  # results of trials that rode along, until the planner asks
        self.ready: deque[TrialSpec] = deque()  # asked for, and already in `spare`
        self.riding: set[str] = set()  # keys riding along in a unit queued or running
        self.planned = 0  # trials planned so far, those stored before included
        self.guess = 0  # the last `expected` said

    def start(self) -> list[TrialSpec]:
        """Reads what the store holds, says what it will do; the first round's trials to run."""
        wanted = set(self.planner.groups)
        for t in self.store.trials():
            spec, result = stored_trial(t)
            if (spec.regime, spec.rank) in wanted:
                self.planner.record(spec, result)
                self.summary.skipped += spec.key in self.done  # whichever round would have asked for it
        pending = self.planner.first()
        self.summary.retried = len({s.key for s in pending} & self.store.keys())
        if self.summary.retried:
            self.listener.note(f"retrying {self.summary.retried} failed trial(s) (--no-retry-failed keeps them as they "
                               "are)")  # fmt: skip
        n = len(plan(self.recipe))
        self.listener.start(total=n, done=n - len(pending))
        self.planned, self.guess = n, max(n, expected_total(self.recipe))
        self.listener.expected(self.guess)
        if self.summary.skipped:
            self.listener.note(f"resuming: {self.summary.skipped} finished trial(s) found in {self.summary.run_dir}, "
                               "not run again")  # fmt: skip
        return pending

    def run(self, fresh: bool) -> SweepSummary:
        pending = self.start()
        # the CPU's slots depend on how long the sweep is: the grid not yet run measures it, as the first round
        # (every other LR) would not
        expected = max(len(pending), sum(s.key not in self.done for s in grid_plan(self.recipe))) if pending else 0
        from .slots import start  # torch and the model load only here, when trials run

        try:
            slots = start(self.recipe, self.execution, self.listener, expected)
        except BaseException:
            if fresh and not self.store.keys():  # an empty folder would pass for the latest run with `mua fit`
                shutil.rmtree(self.summary.run_dir, ignore_errors=True)
            raise
        try:
            self.stream(slots, pending)
            self.summary.full_check_offer = self._offer(slots.trainer)
        except BaseException:
            with contextlib.suppress(Exception):  # a GPU left broken may fail its clean-up: the first error is said
                slots.close(interrupted=True)
            raise
        slots.close()
        return self.summary

    def _offer(self, trainer) -> str:
        """The line that offers `--full-check`, where this sweep measured no full finetuning, one full trial fits
        on the device and the check's expected trials cost less than this sweep's LoRA trials."""
        r = self.recipe
        if r.wants_full or not r.lora_ranks:
            return ""
        check = r.full_check()
        cost = expected_total(check) * FULL_WORK * check.optim.steps / r.optim.steps  # in LoRA trials
        from .memory import full_fits

        try:
            fits = cost < self.planned and full_fits(trainer)
        except Exception:  # noqa: BLE001 — an estimate that cannot be made is no offer, never a failed sweep
            fits = False
        if not fits:
            return ""
        return (f"full finetuning fits on {trainer.device}: --full-check adds a check of it, {check.optim.steps} "
                f"steps a trial, about {cost:.0f} LoRA trials' work (this sweep: {self.planned}); `mua transfer` "
                "then shows it beside its prediction")  # fmt: skip

    def stream(self, slots, pending: list[TrialSpec]) -> None:
        """Feeds `slots` until nothing is left to plan: each result stored as it comes, its group's next trials
        queued when its last one is in, the extra seeds once every group has settled."""
        self._submit(slots, pending, first=True)
        for group in self.planner.groups:
            if not self.waiting[group]:  # resumed: nothing of its first round left to run
                self._submit(slots, self.planner.settle(group))
        while True:
            if self.ready:
                spec = self.ready.popleft()
                result = self.spare.pop(spec.key)
            elif sum(self.waiting.values()):
                spec, result = slots.next()
                self.riding.discard(spec.key)
                if spec.key not in self.wanted:
                    self.spare[spec.key] = result  # rode along: stored only if the planner asks for it
                    continue
            else:  # every group has settled: the one decision over all of them
                if not self._submit(slots, self.planner.extra_seeds(frame(self.store))):
                    break
                continue
            self._store(spec, result)
            group = (spec.regime, spec.rank)
            self.waiting[group] -= 1
            if not self.waiting[group]:
                self._submit(slots, self.planner.settle(group))
        self.summary.added = self.planner.decisions.added
        self.summary.at_edge = self.planner.at_edge()

    def _submit(self, slots, specs: list[TrialSpec], first: bool = False) -> int:
        if not specs:
            return 0
        for s in specs:
            self.waiting[(s.regime, s.rank)] += 1
            self.wanted.add(s.key)
        if not first:
            self.listener.grow(len(specs))
            self.planned += len(specs)
            if self.planned > self.guess:
                self.guess = self.planned
                self.listener.expected(self.guess)
        self.ready.extend(s for s in specs if s.key in self.spare)
        run = [s for s in specs if s.key not in self.spare and s.key not in self.riding]  # riding: stored when back
        queued = slots.submit(run, self._riders(specs) if first else [])
        asked = {s.key for s in run}
        self.riding.update(s.key for unit in queued for s in unit if s.key not in asked)
        return len(specs)

    def _riders(self, specs: list[TrialSpec]) -> list[TrialSpec]:
        """With batched passes, the first round's units take the grid's other LRs along where they have room:
        the fill asks for most of them, and then finds them done."""
        if not self.recipe.sweep.refine:
            return []
        asked = {s.key for s in specs}
        return [s for s in grid_plan(self.recipe) if s.key not in asked and s.key not in self.done]

    def _store(self, spec: TrialSpec, result: TrialResult) -> None:
        self.store.add(spec, result, meta(self.recipe, spec))
        self.done.add(spec.key)
        self.wanted.discard(spec.key)
        self.planner.record(spec, result)
        self.summary.ran += 1
        self.listener.trial_done(spec, result)


def _make_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise MuaError(f"run folder {run_dir} is a file; name a folder with --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MuaError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None


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


def _refuse_other_settings(run_dir: Path, store: TrialStore, recipe: Recipe) -> None:
    """A run's settings as recipe.yaml pins them, else as its store does (the pin the sweep records there, or the
    fingerprint each stored trial carries): a recipe.yaml lost or rewritten does not let other settings in, nor
    lock the run's own settings out."""
    old, stored = dict(store.info()), store.trials()
    prints = {t.user_attrs.get("fingerprint") for t in stored} - {None}
    if not old.get("fingerprint") and len(prints) == 1:
        old["fingerprint"] = next(iter(prints))
    same = [t for t in stored if t.user_attrs.get("fingerprint") == old.get("fingerprint")]
    if same:  # the settings themselves, so that a refusal names what differs
        old = {**same[0].user_attrs.get("recipe", {}), **old}
    wrong = recipe.pin_mismatch(old, f"study {store.name!r}" if store.shared else str(run_dir))
    if wrong:
        raise MuaError(wrong.replace("--out folder", "--study") if store.shared else wrong)
    if not store.shared:
        _pin_recipe(run_dir, recipe, write=False)


def _pin_study(store: TrialStore, recipe: Recipe) -> None:
    """One study, one set of outcome-changing settings, whatever shares its storage."""
    where = f"study {store.name!r}" if store.shared else f"the trial store of {store.run_dir}"
    wrong = recipe.pin_mismatch(store.info(), where)
    if wrong:
        raise MuaError(wrong.replace("--out folder", "--study") if store.shared else wrong)
    store.set_info(**recipe.pin())


def _pin_recipe(run_dir: Path, recipe: Recipe, write: bool = True) -> None:
    """One run folder, one set of outcome-changing settings: a changed `--steps` needs a new folder. `write`:
    False only checks."""
    path = run_dir / "recipe.yaml"
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):  # unreadable: the store's pins stand in (_refuse_other_settings)
            old = {}
        wrong = recipe.pin_mismatch(old if isinstance(old, dict) else {}, str(run_dir))
        if wrong:
            raise MuaError(wrong)
    if not write:
        return
    text = yaml.safe_dump({**recipe.pin(), **recipe.to_dict()}, sort_keys=False)
    if path.is_file() and path.read_bytes() == text.encode():
        return  # nothing to write: a full disk or a read-only folder cannot cost the resumed run its recipe
    try:
        write_atomic(path, text)
    except OSError as e:
        raise MuaError(f"cannot write {path}: {e.strerror or e}") from None
