"""How the terminal hears from mua: one red `error:` line for every bad input (the command line's own
mistakes included), `note:` lines, and exit code 2."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from ..errors import MuaError

# What a command line's mistake raises: typer's public base class (typer vendors click from 0.22 on, and its
# click's exceptions derive from it), and click's own where an older typer uses click itself.
try:
    import click

    USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException, click.ClickException)
except ImportError:  # pragma: no cover - typer ≥ 0.22 needs no click
    USAGE_ERRORS = (typer.TyperException,)

WIDE = 10_000  # columns of a console that is no terminal: a log keeps every line and table whole


class OneLineErrors(TyperGroup):
    """A mistake on the command line (an unknown option, a value of the wrong type) is one `error:` line and
    exit code 2, as every other bad input is, not click's usage panel. `mua` alone prints the help."""

    def main(self, args=None, prog_name=None, *rest, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(args, prog_name, *rest, standalone_mode=False, **kwargs)
        argv = sys.argv[1:] if args is None else list(args)
        if (blank := _blank_name(argv)) is not None:
            error_line(blank)
            sys.exit(2)
        if not argv:  # `mua` alone: the help, on stdout (a context made without parsing, so no error is raised)
            with self.make_context(prog_name or "mua", [], resilient_parsing=True) as ctx:
                typer.echo(ctx.get_help())
            sys.exit(2)
        try:
            code = super().main(argv, prog_name, *rest, standalone_mode=False, **kwargs)
        except typer.Abort:
            sys.exit(1)
        except USAGE_ERRORS as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            error_line(message.replace("\n", " ") + hint)
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


def print_version(value: bool) -> None:
    """`mua --version`."""
    if value:
        import mua_cli

        typer.echo(f"mua {mua_cli.__version__}")
        raise typer.Exit()


def stdout_console(quiet: bool = False) -> Console:
    """The console for a command's output: a terminal's width on a terminal, or the width COLUMNS asks for;
    elsewhere (a pipe, a CI log) so wide that no line wraps and no table is cut, where rich would take 80."""
    console = Console(quiet=quiet)
    if console.is_terminal or os.environ.get("COLUMNS", "").strip().isdigit():
        return console
    return Console(quiet=quiet, width=WIDE)


def whole(renderable):
    """A table whose cells fold onto more lines where the screen is narrow, never cut with an ellipsis (anything
    else as it is)."""
    for column in renderable.columns if isinstance(renderable, Table) else ():
        column.overflow, column.no_wrap = "fold", False
    return renderable


# options whose value names something: an empty one would quietly mean the current folder or a default
NAMING = {"--out": "a folder", "--study": "a study", "--storage": "a storage URL"}


def _blank_name(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in NAMING and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            if not value.strip():
                return f"{name} must name {NAMING[name]}, not {value!r}"
    return None


def error_line(message: str) -> None:
    """One red `error:` line on stderr; the message is printed as it is (brackets are not markup), a line break
    in it (a path holding one, say) shown as `\\n`, so that the error stays one line."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    Console(stderr=True).print(Text("error:", style="bold red"), Text(message), highlight=False, soft_wrap=True)


@contextmanager
def user_errors():
    """A user's mistake is one red line and exit code 2; our bugs keep their traceback."""
    try:
        yield
    except MuaError as e:
        error_line(str(e))
        raise typer.Exit(2) from None


def note(message: str) -> None:
    Console(stderr=True).print(Text("note:", style="yellow"), Text(message), highlight=False, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is, so that a command stops the same way on both."""

    exit_code = 128 + signal.SIGTERM


@contextmanager
def sigterm_as_interrupt():
    """While in the block, SIGTERM (`kill`, a scheduler ending a job) stops the command as Ctrl-C does: the same
    cleanup (worker processes stopped, the trials in hand not stored) and a message, instead of an exit without
    a word. The handler before is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def own_store(folder: Path | None, storage: str | None, study: str | None) -> str | None:
    """--storage; else, for a run folder named on the command line (without --study), that folder's own
    trials.db, which an exported MUA_STORAGE does not replace; else None (MUA_STORAGE, or the run folder's)."""
    if storage is None and folder is not None and study is None and os.environ.get("MUA_STORAGE"):
        from ..api import DB_NAME

        return f"sqlite:///{Path(folder).resolve() / DB_NAME}"
    return storage


def writing_stdout(e: OSError) -> bool:
    """Whether `e` came from a write to stdout (the innermost frame holds stdout: click's echo, rich's print)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    ours = (sys.stdout, getattr(sys.stdout, "buffer", None))
    held = [] if tb is None else [*tb.tb_frame.f_locals.values()]
    return any(any(x is o for o in ours) for v in held for x in (v, getattr(v, "file", None)))


def stdout_broken() -> bool:
    try:
        sys.stdout.flush()
    except OSError:
        return True
    return False


def output_failed(e: OSError) -> int:
    error_line(f"cannot write the output ({e.strerror or e})")
    return 2


def output_error(e: OSError) -> int:
    """Exit code 2 and one line for an error writing stdout; any other OSError is raised again (a bug)."""
    if not (writing_stdout(e) or stdout_broken()):
        raise e
    return output_failed(e)


def flush_stdout(code: int) -> int:
    try:
        sys.stdout.flush()
    except OSError as e:
        return output_failed(e)
    return code
