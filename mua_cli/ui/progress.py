"""Rendering a running sweep: a rich progress bar (trials done / total, current trial, its loss, ETA)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ..api import Listener
from ..spec.trial import TrialResult, TrialSpec


class RichListener(Listener):
    """Progress on a terminal; plain lines (notes only) when `live` is off (--quiet or not a TTY)."""

    def __init__(self, console: Console, live: bool, notes: bool = True):
        self.console, self.live, self.notes = console, live, notes
        self.progress: Progress | None = None
        self.task = None
        self.current = ""

    def __enter__(self) -> RichListener:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def note(self, message: str) -> None:
        if self.notes:
            self.console.print(Text("•", style="cyan"), Text(message))

    def start(self, total: int, done: int) -> None:
        if self.progress:
            self.progress.update(self.task, total=total, completed=done, description="trials")

    def grow(self, added: int) -> None:
        if self.progress:
            t = self.progress.tasks[0]
            self.progress.update(self.task, total=(t.total or 0) + added)

    def trial_start(self, spec: TrialSpec) -> None:
        self.current = spec.label
        if self.progress:
            self.progress.update(self.task, description=self.current)

    def step(self, step: int, loss: float) -> None:
        if self.progress and step % 10 == 0:
            self.progress.update(self.task, description=f"{self.current} step {step} loss {loss:.3f}")

    def trial_done(self, spec: TrialSpec, result: TrialResult) -> None:
        if self.progress:
            self.progress.advance(self.task)
        if result.status == "failed" and self.notes:
            self.console.print(Text("!", style="yellow"), Text(f"{spec.label} failed: {result.error.splitlines()[0]}"))
