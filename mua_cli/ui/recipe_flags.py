"""`mua sweep`'s recipe flags, made from the recipe keys' metadata (spec/config.py): one `--KEY` per key with a
`flag` help, so a new key needs no CLI code and a flag cannot drift from the key it overrides."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated

import typer

from ..spec.config import KEYS

FLAG_KEYS = tuple(k for k, spec in KEYS.items() if spec.meta["flag"])


def _param(key: str) -> inspect.Parameter:
    spec = KEYS[key]
    dash = key.replace("_", "-")
    if spec.kind is bool:
        option = typer.Option(f"--{dash}/--no-{dash}", help=spec.meta["flag"])
    else:
        option = typer.Option(f"--{dash}", help=spec.meta["flag"])
    kind = spec.kind if spec.kind in (bool, int, float) else str  # `targets` is a list in YAML, text on the line
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])  # fmt: skip


def recipe_flags(fn):
    """`fn(..., overrides: dict)` as a command whose recipe flags come after its first parameter; `overrides`
    holds each flag's value (None where not given)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name != "overrides"]
    params = [own[0], *(_param(k) for k in FLAG_KEYS), *own[1:]]

    @functools.wraps(fn)
    def command(**kw):
        return fn(**{k: v for k, v in kw.items() if k not in FLAG_KEYS}, overrides={k: kw[k] for k in FLAG_KEYS})

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer reads the signature above, not fn's
    return command
