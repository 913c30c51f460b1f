"""The README's and docs' example outputs, made by running them on a stored run, so that every number they quote
is one the code prints.

A marked block in README.md or docs/*.md:

    <!-- example: mua transfer --to full-ft -->
    ```console
    $ mua transfer --to full-ft
    (what the command printed, at 120 columns)
    ```
    <!-- /example -->

is replaced by what `mua ...` prints now, run in a folder holding one run, `runs/<name>`, rebuilt from the trials
kept in tests/data/doc_run.json (the embedded default's sweep: `make run`'s first step). Nothing trains: the
examples read stored trials (fit, transfer, trials, theory), so they take seconds.

    python scripts/doc_examples.py                 # rewrite the marked blocks from tests/data/doc_run.json
    python scripts/doc_examples.py --check         # exit 1, naming each block that differs (tests/test_doc_examples.py)
    python scripts/doc_examples.py --from-run runs/tiny-1a2b3c4d   # keep that run's trials first, then rewrite
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORED = ROOT / "tests" / "data" / "doc_run.json"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- example: (?P<cmd>.+?) -->\n)(?P<body>.*?)(<!-- /example -->)", re.S)
COLUMNS = 120


def keep_run(run_dir: Path) -> None:
    """Stores a run's trials (and what the sweep recorded of the run) in tests/data/doc_run.json."""
    from mua_cli.api import export_trials
    from mua_cli.sweep.store import TrialStore

    rows = json.loads(export_trials(run_dir, "json"))
    info = TrialStore.open(run_dir).info()
    head = json.dumps({"run": Path(run_dir).resolve().name, "info": info}, sort_keys=True)[:-1]
    trials = ",\n".join(json.dumps(r, sort_keys=True) for r in rows)  # one trial a line: a readable diff
    STORED.write_text(f'{head}, "trials": [\n{trials}\n]}}\n')
    print(f"kept {len(rows)} trials of {run_dir} in {STORED.relative_to(ROOT)}")


RESULT_FIELDS = ("status", "metric", "loss_curve", "eval_loss", "initial_loss", "wall_time", "device", "error",
                 "info")  # fmt: skip


def rebuild_run(where: Path, stored: Path = STORED) -> Path:
    """The stored run as a run folder under `where`/runs/, its trials written as a sweep writes them."""
    from mua_cli.spec.trial import TrialResult, TrialSpec
    from mua_cli.sweep.store import TrialStore

    doc = json.loads(stored.read_text())
    run_dir = where / "runs" / doc["run"]
    store = TrialStore.create(run_dir)
    for row in doc["trials"]:
        spec = TrialSpec(row["regime"], int(row["rank"]), float(row["lr"]), int(row["seed"]), row["key"])
        result = TrialResult(**{k: row.get(k) for k in RESULT_FIELDS if k in row})
        if result.metric is None:  # JSON's null: a diverged trial's inf, or a failed one's nan
            result.metric = float("inf") if result.status == "diverged" else float("nan")
        result.loss_curve = [float("inf") if v is None else v for v in result.loss_curve or []]
        skip = {"number", "regime", "rank", "lr", "seed", "key", *RESULT_FIELDS}
        store.add(spec, result, {k: v for k, v in row.items() if k not in skip})
    if doc.get("info"):
        store.set_info(**doc["info"])
    return run_dir


def run_example(command: str, cwd: Path) -> str:
    """What `command` (a `mua ...` line) prints, stdout and stderr as a terminal shows them, at COLUMNS wide."""
    from typer.testing import CliRunner

    from mua_cli.ui.cli import app

    argv = shlex.split(command)
    if argv[:1] != ["mua"]:
        raise SystemExit(f"example {command!r}: only `mua ...` commands are run")
    with contextlib.chdir(cwd):
        res = CliRunner().invoke(app, argv[1:], env={"COLUMNS": str(COLUMNS), "NO_COLOR": "1", "TERM": "dumb"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    text = "\n".join(line.rstrip() for line in res.output.rstrip("\n").splitlines())
    code = "" if res.exit_code == 0 else f"\n(exit code {res.exit_code})"
    return f"$ {command}\n{text}{code}"


def render(command: str, cwd: Path) -> str:
    return f"```console\n{run_example(command, cwd)}\n```\n"


def examples(paths=DOCS) -> list[tuple[Path, str]]:
    return [(p, m["cmd"]) for p in paths if p.is_file() for m in BLOCK.finditer(p.read_text())]


def refresh(paths=DOCS, check: bool = False, stored: Path = STORED) -> list[str]:
    """Rewrites (or, with `check`, compares) every marked block; returns the drifted ones as unified diffs."""
    drift: list[str] = []
    outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_cache = os.environ.get("MUA_CACHE")
        os.environ["MUA_CACHE"] = str(Path(tmp) / "cache")
        try:
            built = False
            for path in paths:
                if not path.is_file():
                    continue
                text = path.read_text()

                def fill(m: re.Match, path=path) -> str:
                    nonlocal built
                    cmd = m["cmd"]
                    if not built and cmd.split()[:2] not in (["mua", "theory"], ["mua", "recipes"]):
                        rebuild_run(Path(tmp), stored)  # the commands that read a run: only where there are some
                        built = True
                    if cmd not in outputs:
                        outputs[cmd] = render(cmd, Path(tmp))
                    if m["body"] != outputs[cmd]:
                        diff = difflib.unified_diff(m["body"].splitlines(), outputs[cmd].splitlines(), lineterm="")
                        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                        drift.append(f"{where}: `{cmd}`\n" + "\n".join(diff))
                    return m.group(1) + outputs[cmd] + m.group(4)

                new = BLOCK.sub(fill, text)
                if not check and new != text:
                    path.write_text(new)
        finally:
            if old_cache is None:
                os.environ.pop("MUA_CACHE", None)
            else:
                os.environ["MUA_CACHE"] = old_cache
    return drift


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 where a block differs")
    ap.add_argument("--from-run", type=Path, help="keep this run's trials in tests/data/doc_run.json first")
    args = ap.parse_args()
    if args.from_run:
        keep_run(args.from_run)
    drift = refresh(check=args.check)
    n = len(examples())
    if args.check:
        for d in drift:
            print(d, end="\n\n")
        print(f"{len(drift)} of {n} example blocks differ from what the code prints")
        return 1 if drift else 0
    print(f"{n} example blocks rendered, {len(drift)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
