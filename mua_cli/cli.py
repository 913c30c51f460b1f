"""The `mua` command line: parse, call the library, render. No logic of its own."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import MuaError

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not for users

app = typer.Typer(
    help="""Pick learning rates across LoRA ranks and for full finetuning (Maximal-Update Adaptation, μA).

Run cheap LoRA learning-rate sweeps at small ranks, fit how the optimal learning rate moves with rank,
and predict it for a large rank or for full finetuning.

Examples:

  mua sweep --ranks 4,16,64 --regimes A:r,B:1

  mua fit

  mua transfer --to full-ft

  mua transfer runs/tiny-1a2b3c4d --to 256 --json
""",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
RUNS_DIR = Path("runs")


def consoles(quiet: bool = False) -> tuple[Console, Console]:
    return Console(quiet=quiet), Console(stderr=True)


@contextmanager
def user_errors():
    """A user's mistake is one red line and exit code 2; our bugs keep their traceback."""
    try:
        yield
    except MuaError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def latest_run() -> Path:
    runs = sorted(RUNS_DIR.glob("*/trials.db"), key=lambda p: p.stat().st_mtime) if RUNS_DIR.is_dir() else []
    if not runs:
        raise MuaError("no run folder found under runs/; run `mua sweep` first or name a RUN folder")
    return runs[-1].parent


def run_folder(run: Path | None) -> Path:
    if run is None:
        return latest_run()
    if not run.is_dir():
        raise MuaError(f"run folder {run} does not exist")
    return run


@app.command()
def sweep(
    recipe: Annotated[str | None, typer.Option(help="Recipe name (see `mua recipes`) or path to a YAML file.")] = None,
    ranks: Annotated[str | None, typer.Option(help="LoRA ranks, e.g. 4,16,64; add 'full' for full finetuning.")] = None,
    regimes: Annotated[str | None, typer.Option(help="μA regimes <init>:<scaling>, e.g. A:r,B:1 (see `mua theory`).")] = None,
    lrs: Annotated[str | None, typer.Option(help="LR grid: a power-of-2 range '2^-12:2^-4' or a list '1e-3,2e-3'.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per trial.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per grid point.")] = None,
    alpha0: Annotated[float | None, typer.Option(help="α0 in α = α0 · r^-γ.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step.")] = None,
    metric: Annotated[str | None, typer.Option(help="Final metric: 'train' (last 10 % of steps) or 'eval'.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<recipe>-<settings hash>).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL to share one sweep across machines.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table.")] = False,
):
    """Run LoRA learning-rate sweeps at several ranks and store every trial.

    Re-running the same command skips finished trials; Ctrl-C keeps them.

    Examples:

      mua sweep

      mua sweep --ranks 4,16,64,full --regimes A:r,B:1 --lrs 2^-12:2^-4 --steps 200
    """
    with user_errors():
        from .recipe import load_recipe
        from .report import sweep_table
        from .runner import resolve_device
        from .store import load_trials
        from .sweep import run_sweep

        r = load_recipe(recipe, ranks=ranks, regimes=regimes, lrs=lrs, steps=steps, seeds=seeds, alpha0=alpha0,
                        batch_size=batch_size, metric=metric)
        dev = resolve_device(device)
        run_dir = out or RUNS_DIR / f"{r.name}-{r.fingerprint()[:8]}"
        console, _ = consoles(quiet)
        from .progress import RichListener

        listener = RichListener(console, live=not quiet and console.is_terminal, notes=not quiet)
        listener.note(f"run folder {run_dir} · device {dev} · {r.settings_text()}")
        try:
            with listener:
                summary = run_sweep(r, run_dir, dev, listener, storage)
        except KeyboardInterrupt:
            Console(stderr=True).print(
                f"[yellow]interrupted:[/] finished trials are stored in {run_dir}; run the same command to resume"
            )
            raise typer.Exit(130) from None
        for line in summary.at_edge:
            console.print(f"[yellow]![/] {line}: widen --lrs or raise max_extend")
        console.print(sweep_table(load_trials(run_dir, storage)))
        console.print(f"ran {summary.ran} trial(s), skipped {summary.skipped} already stored · next: mua fit {run_dir}")


@app.command()
def theory():
    """Print μA's regime table: how the optimal LR scales with rank and width per regime."""
    from .report import theory_table

    Console().print(theory_table())


@app.command()
def recipes():
    """List the recipes in recipes/."""
    from .recipe import list_recipes
    from .report import recipes_table

    Console().print(recipes_table(list_recipes()))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
