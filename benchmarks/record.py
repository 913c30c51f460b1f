"""What every benchmark records with its numbers, and where it writes them.

    from record import Recording
    rec = Recording("gpu_speed")            # commit, machine, versions, command line and start time
    rec.add("rows", {...})                  # results, as the benchmark goes
    rec.save(table_rows)                    # benchmarks/out/gpu_speed-<UTC time>.json, and a short table

A result without its commit, machine and library versions cannot be compared with another one later, so a
benchmark takes them all here, at its start, and writes each result into its own file under `benchmarks/out/`
(ignored by git; `MUA_BENCH_OUT` or `out_dir=` names another folder, e.g. `$OUT` on a lent machine). The files
kept in git are the few curated baselines in `benchmarks/baselines/` that docs/performance.md cites.

The commit: `MUA_COMMIT` (and `MUA_DIRTY=1`) where set, for a copy of a commit (a lent machine's, which may sit
inside another checkout); else `git rev-parse HEAD` and whether the tree differs from it, else "unknown".
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PACKAGES = ("torch", "transformers", "peft", "liger-kernel", "optuna", "numpy", "tokenizers", "triton")


def git_commit(root: Path = ROOT) -> dict:
    """The checkout's commit and whether its tracked files differ from it; `MUA_COMMIT` first where it is set (a
    copy of a commit inside another checkout would otherwise report that checkout's)."""
    if os.environ.get("MUA_COMMIT"):
        return {"commit": os.environ["MUA_COMMIT"], "dirty": os.environ.get("MUA_DIRTY") == "1", "from": "MUA_COMMIT"}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20)
        if sha.returncode == 0:
            diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                  capture_output=True, text=True, timeout=20)  # fmt: skip
            return {"commit": sha.stdout.strip(), "dirty": bool(diff.stdout.strip()), "from": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "dirty": None, "from": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """The visible GPUs' names; [] without CUDA. nvidia-smi first: asking torch would create a CUDA context in
    the benchmark's own process, memory the commands it times then cannot use."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        if smi.returncode == 0 and smi.stdout.strip():
            names = dict(line.split(", ", 1) for line in smi.stdout.strip().splitlines())
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is None:
                return list(names.values())
            if all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
                return [names[v.strip()] for v in visible.split(",") if v.strip() in names]
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, no driver: a CPU machine
        return []


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception:
        pass
    return out


def machine() -> dict:
    names = gpus()
    return {
        "hostname": socket.gethostname(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(), "gpu_count": len(names), "gpus": names,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }  # fmt: skip


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Recording:
    """One benchmark run: its context, taken at the start, and its results, written as one JSON file."""

    def __init__(self, name: str, argv: list[str] | None = None, out_dir: str | Path | None = None):
        self.name = name
        self.started = utc_now()
        argv = list(sys.argv if argv is None else argv)
        script = Path(argv[0]).name if argv else name
        self.doc: dict = {
            "benchmark": name,
            "command": " ".join(["python", f"benchmarks/{script}", *argv[1:]]),
            "started_utc": self.started.isoformat(timespec="seconds"),
            **git_commit(),
            "machine": machine(),
            "versions": versions(),
        }
        self.out_dir = Path(out_dir or os.environ.get("MUA_BENCH_OUT") or OUT)

    def add(self, key: str, value) -> None:
        """A result: appended to the list `key` (made on first use)."""
        self.doc.setdefault(key, []).append(value)

    def set(self, key: str, value) -> None:
        self.doc[key] = value

    def path(self) -> Path:
        return self.out_dir / f"{self.name}-{self.started.strftime('%Y%m%dT%H%M%SZ')}.json"

    def save(self, path: str | Path | None = None) -> Path:
        """Writes the recording (again, whole: call it after every result so that a cut-off run keeps what it
        measured) to `path` or `benchmarks/out/<name>-<UTC start>.json`."""
        self.doc["finished_utc"] = utc_now().isoformat(timespec="seconds")
        self.doc["seconds"] = round((utc_now() - self.started).total_seconds(), 1)
        target = Path(path) if path else self.path()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        tmp.replace(target)
        return target

    def header(self) -> str:
        d, m = self.doc, self.doc["machine"]
        v = d["versions"]
        hw = f"{m['gpu_count']} × {m['gpus'][0]}" if m["gpus"] else "no GPU"
        dirty = " (dirty)" if d.get("dirty") else ""
        return (f"{d['benchmark']} at {d['commit'][:10]}{dirty}, {d['started_utc']}, {m['hostname']}: {hw}, "
                f"{m['cpu']} ({m['cpu_cores']} cores); python {v['python']}, torch {v.get('torch')} "
                f"(CUDA {v.get('torch_cuda')}), transformers {v.get('transformers')}, "
                f"peft {v.get('peft')}")  # fmt: skip


def table(rows: list[dict], columns: list[str]) -> str:
    """A short plain-text table of `rows` (dicts) in `columns`; a missing value is '—'."""
    cells = [[str(c) for c in columns]] + [["—" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
