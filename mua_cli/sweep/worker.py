"""Working on a shared study (shared.py): `mua worker` claims units of trials until the planner says the sweep
is done; `mua sweep --study NAME` plans each round and works beside the workers."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MuaError
from ..spec.recipe import Recipe, recipe_from_dict
from . import shared
from .plan import Planner, meta, stored_trial
from .shared import SharedStudy
from .sizing import Execution, trials_per_pass
from .store import STORAGE_ERRORS, TrialStore, frame
from .trainer import Trainer

RETRY_FOR_S = 600  # a database that stays unreachable this long ends the worker (its trials go stale, then back)


@dataclass
class WorkSummary:
    ran: int = 0


def plan_and_work(sweep):
    """The planner of a shared study (`sweep`: a stream.Sweep over a SharedStudy; stream.py calls this, so it is
    not imported here): queues the first round, works on
    it, and once no trial is waiting or running (every worker's finished) queues the next round (plan.Planner,
    round by round), until none is added; then marks the study done. Returns the sweep's summary."""
    recipe, store, listener, summary = sweep.recipe, sweep.store, sweep.listener, sweep.summary
    study = store.study
    for name, value in {shared.SCHEMA_KEY: shared.SCHEMA, shared.RECIPE: recipe.to_dict()}.items():
        if study.user_attrs.get(name) != value:
            study.set_user_attr(name, value)
    study.set_user_attr(shared.STATE, "planning")
    pending = sweep.start()
    trainer = _trainer(recipe, sweep.execution, listener)
    finished = False
    try:
        while True:  # a resumed planner works what an earlier one queued before it decides anything
            if pending:
                with shared.planning_lock(store.rdb, store.name, store.db.parent if store.db else None):
                    queued = shared.enqueue(study, pending, lambda s: meta(recipe, s))
                if queued:
                    listener.note(f"queued {queued} trial(s) in study {store.name!r}; `mua worker` processes may join")
            summary.ran += work(store, recipe, trainer, listener, until_idle=True).ran
            planner = Planner(recipe, store.keys(), listener.note)  # from everything every worker stored
            for t in store.trials():
                planner.record(*stored_trial(t))
            pending = planner.next_round(lambda store=store: frame(store))
            summary.added += planner.decisions.added
            summary.at_edge = planner.at_edge()
            if not pending:
                break
            listener.grow(len(pending))
        study.set_user_attr(shared.STATE, "done")
        finished = True
    finally:
        trainer.close()
        if not finished:  # an error or Ctrl-C: workers stop once the queue is empty; a new planner resumes
            with contextlib.suppress(*STORAGE_ERRORS):
                study.set_user_attr(shared.STATE, "stopped")
    return summary


def _trainer(recipe: Recipe, execution: Execution, listener) -> Trainer:
    return Trainer.load(recipe, execution.device, listener.note, execution.cuda_graphs, execution.fused_kernels)


def join(run_dir: Path, storage: str | None, name: str, device: str, listener, execution: Execution | None,
         wait_s: float) -> WorkSummary:  # fmt: skip
    """`mua worker`: the study's recipe, then units until the study is done. `wait_s`: how long to wait for the
    planner to make the study and for trials to claim (0: a missing study is an error at once)."""
    start = time.monotonic()
    while True:
        try:
            store = SharedStudy.join(run_dir, storage, name)
            raw = store.study.user_attrs.get(shared.RECIPE)
            if raw is not None:
                break
            problem = f"study {store.name!r} has no plan yet: start `mua sweep --study {store.name}` first"
        except MuaError as e:
            problem = str(e)
        if time.monotonic() - start >= wait_s:
            raise MuaError(problem)
        shared.wait()
    recipe = recipe_from_dict(raw, source=f"study {store.name!r}")
    ex = dataclasses.replace(execution or Execution(), device=device)
    trainer = _trainer(recipe, ex, listener)
    try:
        return work(store, recipe, trainer, listener, until_idle=False, wait_s=wait_s, execution=ex)
    finally:
        trainer.close()


def work(store: TrialStore, recipe: Recipe, trainer: Trainer, listener, until_idle: bool, wait_s: float = 0.0,
         execution: Execution | None = None) -> WorkSummary:  # fmt: skip
    """Claims and runs units until none is waiting and none is running (the planner: `until_idle`), or until the
    study is done (a worker). A Ctrl-C or SIGTERM hands the unit in hand back to the queue."""
    study, out = store.study, WorkSummary()
    ex = dataclasses.replace(execution or Execution(), device=trainer.device)
    k = trials_per_pass(ex, recipe, trainer.n_params)
    beat = shared.Heartbeat(study)
    idle_since, said_alive = time.monotonic(), 0.0
    # SIGTERM (a scheduler stopping a job) and SIGINT, even where the shell that started us ignores it (`&` in a
    # script), hand the unit back. The handler only sets STOP: the loop and the trial's step callback raise
    # KeyboardInterrupt where it cannot be swallowed (an exception raised in a handler can land in a finalizer)
    STOP.clear()
    previous = (
        {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    )

    def stop_point(step: int, loss: float) -> None:
        listener.step(step, loss)
        _check_stop()

    try:
        while True:
            _check_stop()
            if until_idle and time.monotonic() - said_alive > 10:  # the planner: workers see it is alive
                _retrying(lambda: study.set_user_attr(shared.PLANNER_SEEN, time.time()), listener)
                said_alive = time.monotonic()
            _retrying(lambda: shared.reap(study), listener)
            unit = _retrying(lambda: shared.claim(study, k, lambda s: _batchable(s, recipe)), listener)
            if unit:
                beat.held = unit
                try:
                    listener.trial_start(unit[0][1])
                    results = trainer.run_unit([spec for _, spec in unit], stop_point, listener.note)
                except BaseException:
                    _retrying(lambda held=unit: shared.release(study, held), listener)
                    raise
                for (trial_id, spec), result in zip(unit, results, strict=True):
                    _retrying(lambda t=trial_id, r=result, s=spec: shared.finish(study, t, r, meta(recipe, s)),
                              listener)  # fmt: skip
                    out.ran += 1
                    listener.trial_done(spec, result)
                beat.held = []
                idle_since = time.monotonic()
                continue
            waiting, running = _retrying(lambda: shared.counts(study), listener)
            if until_idle and not waiting and not running:
                return out
            state = None if until_idle or waiting else _retrying(lambda: study.user_attrs.get(shared.STATE), listener)
            if state == "done":
                return out
            if state is not None and not running and _retrying(lambda: shared.planner_gone(study), listener):
                listener.note("the planner has stopped and the queue is empty: this worker stops")
                return out
            if not until_idle and wait_s and time.monotonic() - idle_since > wait_s:
                listener.note(f"no trial came for {wait_s:g} s: this worker stops")
                return out
            for _ in range(10):  # an idle wait that a signal cuts short
                if STOP.wait(shared.POLL_S / 10):
                    break
    finally:
        beat.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _batchable(spec, recipe: Recipe) -> bool:
    from ..train.stacked import can_batch

    return can_batch(spec, recipe)


def _retrying(fn: Callable, listener):
    """`fn()`, tried again while the database cannot be reached (a restart, say), for up to RETRY_FOR_S."""
    start, told = time.monotonic(), False
    while True:
        try:
            return fn()
        except STORAGE_ERRORS as e:
            if time.monotonic() - start > RETRY_FOR_S:
                raise MuaError(f"the trial store stayed unreachable for {RETRY_FOR_S} s; stopping") from e
            if not told:
                listener.note("the trial store cannot be reached; retrying (finished results are kept in memory)")
                told = True
            time.sleep(1.0)


STOP = threading.Event()  # set by SIGINT or SIGTERM; a second signal stops at once


def _interrupt(signum, frame):
    if STOP.is_set():
        raise KeyboardInterrupt
    STOP.set()


def _check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
