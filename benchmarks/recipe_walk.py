"""Follow a recipe from the sweep's entry point: which of mua's functions receive the recipe (or one of its
sections), and how often the walk enters each module and each room (package folder).

A visit is a run of consecutive calls, among those that receive the recipe or a section as an argument (the
recipe's own methods aside), that stay in one module (or room); going A → B → A counts A twice. The sweep is the
embedded default cut to one rank, one regime, three LRs and 4 steps, run on the CPU in this process.

    python benchmarks/recipe_walk.py     # writes benchmarks/out/recipe_walk-<UTC time>.json (or --out FILE)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from itertools import groupby
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import Recording  # noqa: E402

from mua_cli.api import Execution, load_recipe, run_sweep  # noqa: E402

PKG = str(ROOT / "mua_cli") + "/"


def walk(recipe) -> list[tuple[str, bool]]:
    """(module, whether it got the whole recipe) of each mua_cli call that gets the recipe or a section of it, in
    call order; modules as paths relative to mua_cli/."""
    sections = [getattr(recipe, f.name) for f in dataclasses.fields(recipe)]
    carried = {id(recipe)} | {id(s) for s in sections if dataclasses.is_dataclass(s)}
    calls: list[tuple[str, bool]] = []

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PKG):
            return
        code = frame.f_code
        args = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if code.co_varnames[:1] in (("self",), ("cls",)) and id(args[0]) in carried:
            return  # the recipe's own methods: asking it, not carrying it
        if any(id(a) in carried for a in args):
            calls.append((frame.f_code.co_filename[len(PKG) :], any(a is recipe for a in args)))

    with tempfile.TemporaryDirectory() as tmp:
        sys.setprofile(profile)
        try:
            run_sweep(recipe, Path(tmp) / "run", "cpu", None, None, Execution("cpu", workers_per_gpu=1))
        finally:
            sys.setprofile(None)
    return calls


def visits(names: list[str]) -> dict[str, int]:
    return dict(Counter(k for k, _ in groupby(names)).most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="the JSON file (default benchmarks/out/recipe_walk-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("recipe_walk")
    recipe = load_recipe("tiny", ranks="4", regimes="B:1", lrs="2^-8:2^-6", steps=4, refine=0, max_extend=0)
    calls = walk(recipe)
    modules = [m for m, _ in calls]
    doc = {
        "calls_receiving_the_recipe_or_a_section": len(calls),
        "visits_per_room": visits([m.split("/")[0] if "/" in m else m for m in modules]),
        "visits_per_module": visits(modules),
        "calls_per_module_whole_recipe_vs_a_section_only": {
            m: [sum(1 for x, w in calls if x == m and w), sum(1 for x, w in calls if x == m and not w)]
            for m in visits(modules)
        },
    }
    print(json.dumps(doc, indent=1))
    rec.doc.update(doc)
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
