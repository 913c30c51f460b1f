"""How the terminal hears from mua: one red `error:` line for every bad input (the command line's own
mistakes included), `note:` lines, and exit code 2."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

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


def error_line(message: str) -> None:
    """One red `error:` line on stderr; the message is printed as it is (brackets are not markup)."""
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
