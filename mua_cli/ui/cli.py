"""The `mua` command line: parse, call the library, render. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from .. import quiet_libraries  # noqa: F401 — before any library prints
from ..errors import MuaError
from . import console as terminal  # SIGTERM, stdout's failures, MUA_STORAGE beside a named run folder
from .console import OneLineErrors, note, print_version, stdout_console, user_errors, whole
from .recipe_flags import recipe_flags
from .runs import RUNS_DIR, name_run, run_folder
from .trials import trials

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
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrors,
)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=print_version, help="Print mua's version and exit.")
    ] = False,
):
    pass


def consoles(quiet: bool = False) -> tuple[Console, Console]:
    return stdout_console(quiet), Console(stderr=True)


def gpu_device_files() -> bool:  # a guess made without importing torch
    return Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists()


@app.command()
@recipe_flags
def sweep(
    recipe: Annotated[str | None, typer.Option(help="Recipe name (see `mua recipes`) or path to a YAML file.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<recipe>-<settings hash>).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda (every visible GPU) or cuda:N.")] = "auto",
    workers_per_gpu: Annotated[
        int, typer.Option(min=0, help="Trial slots per GPU (threads; processes with --no-cuda-graphs); 0: by size.")
    ] = 0,
    batch_trials: Annotated[
        int, typer.Option(min=0, help="LoRA trials per forward pass (same rank, other LRs); 0 picks by size.")
    ] = 0,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay each step as a CUDA graph.")
    ] = True,
    fused_kernels: Annotated[
        bool,
        typer.Option("--fused-kernels/--no-fused-kernels", help="On a GPU, Liger's fused kernels where installed."),
    ] = True,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL, e.g. postgresql://USER@HOST/DB (default: the run folder).")
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Plan into this shared study: `mua worker --study NAME` processes join it.")
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed/--no-retry-failed", help="Run failed trials (errors, not divergences) again."),
    ] = True,
    full_check: Annotated[
        bool,
        typer.Option(
            "--full-check",
            help="Then sweep full finetuning alone at 1/4 of the steps into RUN/full-check; `mua transfer` shows "
            "it beside its prediction.",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress and no table: the run folder alone, on stdout.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Check everything and print the plan (trials, memory, time); run and write nothing."
        ),
    ] = False,
    overrides: dict | None = None,
):
    """Run LoRA learning-rate sweeps at several ranks and store every trial.

    Re-running the same command skips finished trials; Ctrl-C keeps them.

    Examples:

      mua sweep

      mua sweep --ranks 4,16,64,full --regimes A:r,B:1 --lrs 2^-12:2^-4 --steps 200

      mua sweep --recipe roberta-base-sst2 --ranks 4,16,full --per-layer-lr

      mua sweep --storage postgresql://mua@db/mua --study big --device cuda:0   (then `mua worker` anywhere)
    """
    with user_errors():
        if dry_run:
            from .plan import dry_run_plan

            return dry_run_plan(recipe, out, device, overrides, storage, study, quiet, full_check)
        if device == "cpu" or (device == "auto" and not gpu_device_files()):
            from ..api import start_process_server

            start_process_server()  # before this process imports torch: the two import side by side
        from ..api import Execution, load_trials, resolve_device, run_sweep
        from ..spec.recipe import load_recipe

        r = load_recipe(recipe, **(overrides or {}))
        dev = resolve_device(device)
        run_dir = out or RUNS_DIR / f"{r.name}-{r.fingerprint()[:8]}"
        console, _ = consoles(quiet)
        from .progress import RichListener, sweep_done

        listener = RichListener(console, live=not quiet and console.is_terminal, notes=not quiet)
        listener.note(f"run folder {run_dir} · device {dev} · {r.settings_text()}")
        try:
            with terminal.sigterm_as_interrupt(), listener:
                ex = Execution(dev, workers_per_gpu, batch_trials, cuda_graphs, fused_kernels)
                storage = terminal.own_store(out, storage, study)
                summary = run_sweep(r, run_dir, dev, listener, storage, ex, retry_failed, study, full_check)
        except KeyboardInterrupt as e:
            Console(stderr=True).print(
                Text("stopped by SIGTERM:" if isinstance(e, terminal.Terminated) else "interrupted:", style="yellow"),
                Text(f"finished trials are stored in {run_dir}; run the same command to resume"),
            )
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        sweep_done(console, summary, load_trials(run_dir, storage, study), run_dir, quiet)


@app.command()
def fit(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the newest under runs/).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print fit.json to stdout.")] = False,
    plot: Annotated[bool, typer.Option(help="Write fit.png.")] = True,
    storage: Annotated[str | None, typer.Option(help="Read the trials from this Optuna storage URL.")] = None,
    study: Annotated[str | None, typer.Option(help="Read this shared study (default run folder runs/NAME).")] = None,
):
    """Find η* per regime and rank, fit the η*-vs-rank exponent per regime and test it against μA.

    Writes fit.json and fit.png into the run folder.

    Examples:

      mua fit

      mua fit runs/tiny-1a2b3c4d --json
    """
    with user_errors():
        from .report import fit_tables

        run_dir = run_folder(run, storage, study)
        name_run(run, run_dir, stderr=json_out, shared=bool(storage or study))
        storage = terminal.own_store(run, storage, study)  # after name_run: not a shared store
        from ..api import refit

        result, saved = refit(run_dir, note, storage, study)
        wrote = [run_dir / "fit.json"] if saved else []
        if plot and saved:  # a folder that took no fit.json takes no picture either
            from .plots import plot_fit

            try:
                wrote.append(plot_fit(result, run_dir / "fit.png"))
            except OSError as e:
                note(f"fit.png not saved: cannot write in {run_dir} ({e.strerror or e})")
        if json_out:
            typer.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
            return
        console = stdout_console()
        for table in fit_tables(result):
            console.print(whole(table))
        if wrote:
            console.print("wrote " + " and ".join(map(str, wrote)), markup=False)


@app.command()
def transfer(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the newest under runs/).")] = None,
    to: Annotated[str, typer.Option("--to", help="'full-ft', or a target LoRA rank such as 256.")] = "full-ft",
    regime: Annotated[
        str | None, typer.Option(help="Regime for a rank target (default B:1 if swept, else the first).")
    ] = None,
    basis: Annotated[
        str,
        typer.Option(
            help="auto (measured if the run has the target, else the study's rule), predict (the rule even "
            "where measured), measured, shrunk-slope, measured-slope, muA-slope (ranks), calibrated, "
            "study-offset, muA-B:1 (full-ft)."
        ),
    ] = "auto",
    calibrate: Annotated[
        Path | None,
        typer.Option(help="A proxy run with B:1 and full-ft trials (smaller model or fewer steps): its offset."),
    ] = None,
    heuristic: Annotated[
        bool, typer.Option(help="Allow the 'LoRA Without Regret' heuristic (A:r LR / 10) for full-ft.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the learning rate alone.")] = False,
    storage: Annotated[str | None, typer.Option(help="Read the trials from this Optuna storage URL.")] = None,
    study: Annotated[str | None, typer.Option(help="Read this shared study.")] = None,
):
    """The learning rate for full finetuning or a target LoRA rank, with an interval and its basis.

    Measured beats predicted: a run that swept the target answers with its measured optimum.

    Examples:

      mua transfer --to full-ft

      mua transfer runs/big --to full-ft --calibrate runs/small-proxy

      mua transfer runs/tiny-1a2b3c4d --to 256 --regime A:r

      LR=$(mua transfer --to full-ft --quiet)
    """
    with user_errors():
        from ..api import fit as fit_of
        from ..api import full_check_fit, is_full_target, predict
        from .report import prediction_panel

        # fit.json where it is newer than the trials (fit wrote it), else a fresh fit
        run_dir = run_folder(run, storage, study)
        name_run(run, run_dir, stderr=json_out or quiet, shared=bool(storage or study))
        storage = terminal.own_store(run, storage, study)  # after name_run: not a shared store
        result = fit_of(run_dir, fresh=False, on_note=note, storage=storage, study=study)
        proxy = fit_of(run_folder(calibrate), fresh=False, on_note=note) if calibrate is not None else None
        local_full = is_full_target(to) and storage is None and study is None  # a rank target reads no check
        check = full_check_fit(run_dir, note) if local_full else None
        pred = predict(result, to, regime, basis, proxy, heuristic, check)
        if json_out:
            typer.echo(json.dumps(pred.to_dict(), allow_nan=False))
        elif quiet:
            typer.echo(f"{pred.lr:.6g}")
        else:
            stdout_console().print(prediction_panel(pred))


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="The shared study to work on (planned by `mua sweep --study NAME`).")],
    storage: Annotated[
        str | None, typer.Option(help="Its Optuna storage URL (default: the SQLite file of --out).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder whose trials.db holds the study (one machine).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N: one worker, one device.")] = "auto",
    batch_trials: Annotated[int, typer.Option(min=0, help="LoRA trials per forward pass; 0 picks by size.")] = 0,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay each step as a CUDA graph.")
    ] = True,
    wait: Annotated[
        float,
        typer.Option(
            min=0,
            help="Wait this long for the planner to make the study, and stop after this long with "
            "no trial to run (0: a missing study is an error; wait for the sweep to be done).",
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
):
    """Work on a shared study: run its queued trials until its sweep is done.

    Start any number, on any machines, one or more per GPU. A worker killed mid-trial loses only that trial's
    progress: its heartbeat stops, and another worker runs the trial again. Ctrl-C hands the trial back.

    Examples:

      mua worker --storage postgresql://mua@db/mua --study big --device cuda:0

      mua worker --out runs/tiny --study mua --device cpu
    """
    with user_errors():
        from ..api import Execution, resolve_device, work
        from .progress import RichListener

        if storage is None and out is None and not os.environ.get("MUA_STORAGE"):
            raise MuaError("mua worker needs --storage URL, or --out RUN for a study in that run folder's trials.db")
        dev = resolve_device(device)
        if dev == "cuda":
            dev = "cuda:0"  # one worker, one GPU: start one per GPU with --device cuda:N

        console, _ = consoles(quiet)
        listener = RichListener(console, live=not quiet and console.is_terminal, notes=not quiet)
        try:
            with listener:
                ex = Execution(dev, 0, batch_trials, cuda_graphs)
                summary = work(out or RUNS_DIR / study, storage, study, dev, listener, ex, wait)
        except KeyboardInterrupt:
            Console(stderr=True).print("[yellow]interrupted:[/] the trials in hand went back to the queue")
            raise typer.Exit(130) from None
        console.print(
            f"ran {summary.ran} trial(s) for study {study!r} · next: mua fit --study {study}"
            + (" --storage URL" if storage else f" {out}"),
            markup=False,
        )


app.command()(trials)  # ui/trials.py: `mua trials RUN --format csv|json`


@app.command()
def theory():
    """Print μA's regime table: how the optimal LR scales with rank and width per regime."""
    from .report import theory_table

    stdout_console().print(whole(theory_table()))


@app.command()
def recipes():
    """List the recipes in recipes/."""
    from ..spec.recipe import list_recipes
    from .report import recipes_table

    stdout_console().print(whole(recipes_table(list_recipes())))


def main() -> None:
    """The console script. Once the command is done, the process ends without tearing down every module it
    imported (torch, transformers, peft: a second or more, paid by every command); exit handlers still run
    (a sweep's worker processes stop there) and the output is flushed first. An uncaught exception, a bug,
    ends as Python ends it."""
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    except OSError as e:  # stdout is a full disk (`> /dev/full`) or gone: one line, not a traceback
        code = terminal.output_error(e)
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 — what Python runs at exit; skipped by os._exit
    code = terminal.flush_stdout(code)
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
