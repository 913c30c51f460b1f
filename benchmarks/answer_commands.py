"""How long the commands after a sweep take: `mua fit RUN`, then `mua transfer RUN --to full-ft --quiet`, each a
fresh process, this tree against another commit's (`--against`), alternated `--repeats` times, medians kept.

    python benchmarks/answer_commands.py [--against COMMIT] [--run DIR] [--repeats 5] [--out FILE.json]

They are part of a race's time to answer (gpu_speed.py), and what a CI job pays for its learning rate. Without
`--run`, a small real sweep of the embedded model (B:1, ranks 4 and 16, 10 steps) is made first, in a temporary
folder. Each command runs from that folder, not from the repository's (Python puts the current folder first on its
path, so a tree passed on PYTHONPATH would lose to the working tree), and checks which `mua_cli` it imported. The
transfer's answer must be the same for both trees: the table says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import Recording, table  # noqa: E402

SMALL_SWEEP = ["sweep", "--ranks", "4,16", "--regimes", "B:1", "--lrs", "2^-8:2^-4", "--steps", "10", "--refine", "0",
               "--device", "cpu", "--quiet"]  # fmt: skip


def command(tree: Path, args: list[str], cwd: Path) -> tuple[float, str]:
    """Seconds of `mua ARGS` run from `tree`'s mua_cli in a fresh process, and what it printed."""
    code = (f"import mua_cli, sys; assert mua_cli.__file__.startswith({str(tree)!r}), mua_cli.__file__; "
            f"sys.argv = ['mua'] + {args!r}; from mua_cli.ui.cli import main; main()")  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)})  # fmt: skip
    s = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"mua {' '.join(args)} from {tree} failed:\n{done.stderr[-2000:]}")
    return s, done.stdout.strip()


def tree_of(commit: str, into: Path) -> Path:
    """`commit`'s files (git archive), unpacked under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="a commit to time beside this tree")
    ap.add_argument("--run", type=Path, help="a run folder with trials (default: a small sweep made first)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/answer_commands-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("answer_commands")
    with tempfile.TemporaryDirectory(prefix="mua-answer-") as d:
        work = Path(d)
        trees = {"this tree": ROOT}
        if args.against:
            trees[args.against] = tree_of(args.against, work / "against")
        run = args.run.resolve() if args.run else work / "run"
        if not args.run:
            command(ROOT, [*SMALL_SWEEP, "--out", str(run)], work)
        fit_args, transfer_args = ["fit", str(run)], ["transfer", str(run), "--to", "full-ft", "--quiet"]
        times: dict[tuple[str, str], list[float]] = {}
        answers: dict[str, set[str]] = {}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                for what, cmd in (("fit", fit_args), ("transfer", transfer_args)):
                    s, printed = command(tree, cmd, work)
                    times.setdefault((name, what), []).append(round(s, 3))
                    if what == "transfer":
                        answers.setdefault(name, set()).add(printed)
        rows = [{"tree": name, "command": what, "median_s": round(statistics.median(v), 3), "each_s": v}
                for (name, what), v in times.items()]  # fmt: skip
        same = len(set().union(*answers.values())) == 1
        rec.doc.update({"run": str(args.run or "a small sweep (SMALL_SWEEP)"), "rows": rows,
                        "answers": {k: sorted(v) for k, v in answers.items()}, "same_answer": same})  # fmt: skip
    print(rec.header())
    print(table(rows, ["tree", "command", "median_s", "each_s"]))
    print(f"the same transfer answer from every tree and repeat: {same}")
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
