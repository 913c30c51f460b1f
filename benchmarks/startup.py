"""What a process pays before its first trial: Python, the imports a sweep needs, and CUDA's start, each timed
in fresh processes (the variants alternated, `--repeats` times, the median kept), and which packages the
sweep's imports spend their time in (`python -X importtime`).

    python benchmarks/startup.py [--repeats 3] [--out FILE.json]

A race (gpu_speed.py) times each side from its process's start, so what both sides import is a floor under
both; this says how high it is on the machine at hand, and what starting CUDA beside the imports would save.
Each variant takes as long as its imports: on a lent H100, where importing a sweep's libraries takes about 10 s,
allow 3 minutes for two repeats.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import Recording, table  # noqa: E402

SWEEP_IMPORTS = "import mua_cli.api, mua_cli.sweep.stream, mua_cli.sweep.slots, mua_cli.sweep.trainer"  # as `mua sweep`
CUDA = "torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
VARIANTS = {
    "python": "pass",
    "torch": "import torch",
    "torch, CUDA started": f"import torch; {CUDA}",
    "transformers' model, peft": "import torch, peft, transformers.models.llama.modeling_llama",
    "a sweep's imports": SWEEP_IMPORTS,
    "the race's plain loop (plain_loop.py)": "import sys; sys.path.insert(0, 'benchmarks'); import plain_loop",
    "gpu_speed.py, the plain loop's process until 2026-12-07": (
        "import sys; sys.path.insert(0, 'benchmarks'); import gpu_speed"
    ),
    "a sweep's imports, then CUDA": f"import torch; {SWEEP_IMPORTS}; {CUDA}",
    "a sweep's imports, CUDA started beside them": (
        "import threading, torch; t = threading.Thread(target=lambda: (" + CUDA.replace("; ", ", ") + ")); "
        f"t.start(); {SWEEP_IMPORTS}; t.join()"
    ),
}


def seconds(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - t


def by_package(code: str) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """-X importtime's self seconds summed by top-level package, and each top-level package's cumulative
    seconds (itself and what it imported first), the slowest first."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stderr  # fmt: skip
    own: dict[str, float] = defaultdict(float)
    slow = []
    for m in re.finditer(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", err):
        self_us, cum_us, name = int(m[1]), int(m[2]), m[4]
        own[name.split(".")[0]] += self_us / 1e6
        if "." not in name:
            slow.append((name, cum_us / 1e6))
    top = dict(sorted(own.items(), key=lambda kv: -kv[1])[:15])
    return {k: round(v, 3) for k, v in top.items()}, sorted(slow, key=lambda kv: -kv[1])[:25]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cuda", action="store_true", help="leave out the variants that start CUDA")
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/startup-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("startup")
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_cuda and "cuda" in v)}
    seconds(SWEEP_IMPORTS)  # the first process reads the libraries from disk; the others find them cached
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        for name, code in variants.items():
            times[name].append(round(seconds(code), 3))
            rows = [{"variant": k, "median_s": round(statistics.median(v), 3), "each_s": v} for k, v in times.items()]
            rec.set("rows", rows)
            rec.save(args.out)  # a run cut short keeps what it measured
    own, slow = by_package(SWEEP_IMPORTS)
    slowest = [{"module": n, "cumulative_s": round(s, 3)} for n, s in slow]
    rec.doc.update({"sweep_imports_self_s_by_package": own, "sweep_imports_slowest": slowest})
    print(rec.header())
    print(table(rows, ["variant", "median_s", "each_s"]))
    print("self seconds by package:", own)
    for name, s in slow[:12]:
        print(f"  {s:6.2f} s  {name}")
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
