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
from rich.text import Text
from typer.core import TyperGroup

try:  # typer carries its own click from 0.22 on
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError

from ..errors import MuaError


class OneLineErrors(TyperGroup):
    """A mistake on the command line (an unknown option, a value of the wrong type) is one `error:` line and
    exit code 2, as every other bad input is, not click's usage panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = list(args[0] if args and args[0] is not None else kwargs.get("args") or sys.argv[1:])
        if (blank := _blank_name(argv)) is not None:
            error_line(blank)
            sys.exit(2)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # `mua` alone: the help
            typer.echo(e.ctx.get_help())
            sys.exit(e.exit_code)
        except ClickException as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            error_line(e.format_message().replace("\n", " ") + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


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
