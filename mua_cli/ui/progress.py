"""Rendering a running sweep. On a terminal: a bar of trials done, an ETA over the whole expected sweep, and one
row per running trial with its step and latest loss. Elsewhere (a CI log, a pipe): one plain line per finished
trial. `--quiet`: nothing."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..api import Listener
from ..science.theory import FULL, lr_label
from ..spec.trial import TrialResult, TrialSpec


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RichListener(Listener):
    """Progress on a terminal (`live`); plain lines (notes and one per finished trial) when `live` is off and
    `notes` on (not a TTY); nothing but trial failures' absence when both are off (--quiet)."""

    def __init__(self, console: Console, live: bool, notes: bool = True):
        self.console, self.live, self.notes = console, live, notes
        self.progress: Progress | None = None
        self.task = None
        self.total = 0  # trials the sweep has planned so far (skipped ones included)
        self.done = 0  # of those, finished (skipped ones included)
        self.skipped = 0  # finished before this process began
        self.guess: int | None = None  # the sweep's estimate of its final trial count, where it gives one
        self.t0 = time.monotonic()
        self.running: dict[str, tuple[object, str]] = {}  # spec key → its progress row and label
        self.last_key: str | None = None

    def __enter__(self) -> RichListener:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("starting", total=None, eta="")
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            for row, _ in self.running.values():
                self.progress.remove_task(row)
            self.running.clear()
            self.progress.stop()

    # ------------------------------------------------------------------ what the sweep says

    def note(self, message: str) -> None:
        if self.notes:
            self.console.print(Text("•", style="cyan"), Text(message))

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.skipped = total, done, done
        self.t0 = time.monotonic()
        self._refresh()

    def expected(self, n: int) -> None:
        """The sweep's estimate of how many trials it will have when it ends (rounds to come included)."""
        self.guess = int(n) if n else None
        self._refresh()

    def grow(self, added: int) -> None:
        self.total += added
        self._refresh()

    def trial_start(self, spec: TrialSpec) -> None:
        self.last_key = spec.key or spec.label
        if self.progress and self.last_key not in self.running:
            label = f"  {spec.label}"
            self.running[self.last_key] = (self.progress.add_task(label, total=None, eta=""), label)

    def step(self, step: int, loss: float) -> None:
        """The unit running in this thread (the last trial_start)."""
        if self.last_key is not None:
            self._show(self.last_key, None, step, loss)

    def loss(self, spec: TrialSpec, step: int, loss: float) -> None:
        """A pool slot's running unit (its first trial), every few steps."""
        self._show(spec.key or spec.label, spec, step, loss)

    def _show(self, key: str, spec: TrialSpec | None, step: int, loss: float) -> None:
        if self.progress is None or (spec is None and step % 10):
            return
        if key not in self.running:
            if spec is None:
                return
            self.trial_start(spec)
        row, label = self.running[key]
        self.progress.update(row, description=f"{label} · step {step} · loss {loss:.4g}")

    def trial_done(self, spec: TrialSpec, result: TrialResult) -> None:
        self.done += 1
        key = spec.key or spec.label
        if self.progress and key in self.running:
            self.progress.remove_task(self.running.pop(key)[0])
        if self.progress is None and self.notes:
            self.console.print(self.trial_line(spec, result), markup=False, highlight=False, soft_wrap=True)
        elif result.status == "failed" and self.notes:
            self.console.print(Text("!", style="yellow"), Text(f"{spec.label} failed: {result.error.splitlines()[0]}"))
        self._refresh()

    # ------------------------------------------------------------------ rendering

    def trial_line(self, spec: TrialSpec, result: TrialResult) -> str:
        """One finished trial as one plain line: what a log keeps, with the time the sweep has left."""
        what = "full-ft" if spec.regime == FULL else f"{spec.regime} rank {spec.rank}"
        metric = f"metric {result.metric:.6g}" if math.isfinite(result.metric) else f"metric {result.metric}"
        error = f" ({result.error.splitlines()[0]})" if result.status == "failed" and result.error else ""
        return (
            f"trial {self.done}/{max(self.total, self.done)}: {what} lr {lr_label(spec.lr)} ({spec.lr:.4g}) "
            f"seed {spec.seed} {result.status}{error} {metric} {result.wall_time:.1f} s"
            + (f" · {eta}" if (eta := self.eta_text()) else "")
        )

    def eta_text(self) -> str:
        """The time left for the whole sweep: this process's seconds per trial × the trials left of the expected
        total; where the sweep gives no estimate, of the trials planned so far, and said to be a floor."""
        ran = self.done - self.skipped
        if ran <= 0:
            return ""
        per = (time.monotonic() - self.t0) / ran
        if self.guess is not None and self.guess >= self.total:
            left = max(self.guess - self.done, 0)
            return f"ETA {_clock(per * left)} (about {self.guess} trials in all)"
        return f"ETA ≥ {_clock(per * max(self.total - self.done, 0))} (the rounds planned so far)"

    def _refresh(self) -> None:
        if self.progress and self.task is not None:
            self.progress.update(self.task, total=self.total, completed=self.done, description="trials",
                                 eta=self.eta_text())  # fmt: skip


def sweep_done(console: Console, summary, trials, run_dir, quiet: bool) -> None:
    """What a finished sweep prints: groups still at an edge, the table of its trials, what ran; with `--quiet`
    the run folder alone, on stdout (RUN=$(mua sweep --quiet))."""
    from .console import whole
    from .report import sweep_table

    for line in summary.at_edge:
        console.print(Text("!", style="yellow"), Text(f"{line}: widen --lrs or raise max_extend"))
    console.print(whole(sweep_table(trials)))
    retried = f" ({summary.retried} of them failed before)" if summary.retried else ""
    console.print(
        f"ran {summary.ran} trial(s){retried}, skipped {summary.skipped} already stored · next: mua fit {run_dir}",
        markup=False,
    )
    if summary.check is not None:
        c = summary.check
        console.print(f"full-finetuning check: ran {c.ran} trial(s), skipped {c.skipped} already stored, in "
                      f"{c.run_dir}", markup=False)  # fmt: skip
    elif summary.full_check_offer and not quiet:
        console.print(Text("•", style="cyan"), Text(summary.full_check_offer))
    if quiet:
        print(run_dir, flush=True)
