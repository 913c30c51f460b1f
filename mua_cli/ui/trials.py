"""`mua trials`: a run's trials exported to stdout, one row a trial (as `optuna trials -f json` does)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import user_errors
from .runs import run_folder


def trials(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the newest under runs/).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv or json.")] = "csv",
    storage: Annotated[str | None, typer.Option(help="Read the trials from this Optuna storage URL.")] = None,
    study: Annotated[str | None, typer.Option(help="Read this shared study.")] = None,
):
    """Export a run's trials to stdout, one row a trial (as `optuna trials -f json` does).

    Examples:

      mua trials runs/tiny-1a2b3c4d --format json > trials.json

      mua trials --format csv > trials.csv
    """
    with user_errors():
        from ..api import export_trials

        run_dir = run_folder(run, storage, study)
        typer.echo(export_trials(run_dir, fmt.strip().lower(), storage, study), nl=False)
