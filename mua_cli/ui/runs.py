"""Which run folder a command reads: the one named, a shared study's, or the newest under runs/ (said aloud)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MuaError
from .console import note, stdout_console

RUNS_DIR = Path("runs")


def latest_run() -> Path:
    """The newest run folder under runs/ whose store holds a trial (a sweep killed before its first trial
    leaves an empty one behind, which is no answer to `mua fit`)."""
    from ..api import has_trials

    runs = sorted(RUNS_DIR.glob("*/trials.db"), key=lambda p: p.stat().st_mtime) if RUNS_DIR.is_dir() else []
    for db in reversed(runs):
        try:
            if has_trials(db.parent):
                return db.parent
        except MuaError:
            continue
    raise MuaError("no run folder with trials under runs/; run `mua sweep` first or name a RUN folder")


def run_folder(run: Path | None, storage: str | None = None, study: str | None = None) -> Path:
    """The run folder to read: the one named, or for a shared study runs/<study> (for fit.json), or the newest
    under runs/."""
    if run is None and (storage or study):
        return RUNS_DIR / (study or "mua")  # made by the fit, once there is one to save
    if run is None:
        return latest_run()
    if not run.is_dir():
        raise MuaError(f"run folder {run} does not exist")
    return run


def name_run(run: Path | None, run_dir: Path, stderr: bool, shared: bool = False) -> None:
    """Says which run folder a command with no RUN read (the newest under runs/): on stdout with the tables, on
    stderr when stdout is for machines (--json, --quiet). `shared`: a study was named, which is answer enough."""
    if run is not None or shared:
        return
    line = f"run folder {run_dir} (the newest under {RUNS_DIR}/ with trials; name a RUN to read another)"
    if stderr:
        note(line)
    else:
        stdout_console().print(line, markup=False, highlight=False, soft_wrap=True)
