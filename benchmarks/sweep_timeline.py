"""Where a sweep's time went: each device busy or idle, phase by phase, from the run's own trial store.

    python benchmarks/sweep_timeline.py RUN_DIR [--start EPOCH] [--end EPOCH] [--answer EPOCH] [--gap 0.5] [--json]

What the store holds (sweep/store.py writes each trial once, when it has finished, with Optuna's `add_trial`):
Optuna's `datetime_complete` (when the trial was stored; `datetime_start` is the same instant, since the trial
is created finished), and mua's `wall_time` (seconds from the start of the trial, or of its batched group divided
by the group's size `info.batched_with`) and `device`. So a unit of work (one trial, or one batched group) ran on
its device over [stored − wall_time · batched_with, stored]; trials of one group cover the same interval. Every
stored trial counts, the failed ones a sweep ran again included: they held the device too. A trial that carries
its own `started_at` (epoch seconds) in its user attributes or `info` is taken at its word instead, and so is
`info.finished_at` (sweep/trainer.py records both: a trial that rode along in a unit is stored when asked for).

A device is busy while at least one unit is in flight on it (several slots of one GPU overlap); that counts the
unit's own set-up on the CPU (its model built, its graph captured) as busy, so busy is an upper bound of the
GPU's kernel time, and idle a lower bound of its waiting. The phases:
- start-up: from the sweep's start (`--start`, else the run's recipe.yaml's time, written as the sweep began)
  to the first unit's start: imports, the model and data loaded, workers started;
- run 1, run 2, …: stretches where some device has a unit in flight, split where every device was idle for
  `--gap` seconds or more: with a sweep that waits between rounds, one stretch per round or refinement;
- wait 1, wait 2, …: those gaps (planning the next round, a fit between rounds, the next group's set-up);
- wind-down: the last unit's end to the sweep's end (`--end`: the command returned; else the last store);
- fit + transfer: `--end` to `--answer` (the final `mua transfer` value), where given.
Times are seconds from the sweep's start. benchmarks/gpu_speed.py calls `timeline()` and records its result.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DB_NAME = "trials.db"  # the run folder's store (mua_cli/sweep/store.py)


def stored_trials(run_dir: Path) -> list[dict]:
    """Every finished or failed trial in the run folder's store, read-only: its time stored (epoch seconds),
    wall time, device, group size and its own start time where it recorded one."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = Path(run_dir) / DB_NAME
    if not db.is_file():
        raise SystemExit(f"{run_dir} holds no {DB_NAME}")
    uri = f"{db.resolve().as_uri()}?mode=ro"
    storage = optuna.storages.RDBStorage(
        "sqlite://",
        engine_kwargs={"creator": lambda: sqlite3.connect(uri, uri=True, check_same_thread=False)},
        skip_table_creation=True,
    )
    studies = optuna.get_all_study_summaries(storage)
    if not studies:
        return []
    name = max(studies, key=lambda s: s.n_trials).study_name  # the run's own study ("mua", or its --study name)
    out = []
    for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL) or t.datetime_complete is None:
            continue
        a = t.user_attrs
        info = a.get("info") if isinstance(a.get("info"), dict) else {}
        k = int(info.get("batched_with", 1) or 1)
        wall = float(a.get("wall_time") or 0.0)
        end = t.datetime_complete.timestamp()  # Optuna's naive local time, as time.time() counts
        end = float(info.get("finished_at", end))  # a trial that rode along in a unit is stored when asked for
        own = a.get("started_at", info.get("started_at"))
        start = float(own) if own is not None else end - wall * k
        out.append({"number": t.number, "device": str(a.get("device", "?")), "start": start, "end": end,
                    "batched_with": k, "status": a.get("status"), "regime": t.params.get("regime"),
                    "rank": t.params.get("rank"), "lr": t.params.get("lr"), "seed": t.params.get("seed"),
                    "slot": a.get("slot", info.get("slot")), "own_start": own is not None,
                    "phases": info.get("phases_s"), "warm": bool(info.get("warm_unit")),
                    "kept_idle": info.get("kept_idle"), "kept_freed": info.get("kept_freed"),
                    "ran_out": bool(info.get("ran_out_beside_kept"))})  # fmt: skip
    return sorted(out, key=lambda r: r["start"])


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def overlap(spans: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(y, b) - max(x, a)) for x, y in spans)


def timeline(
    run_dir: str | Path,
    start: float | None = None,
    end: float | None = None,
    answer: float | None = None,
    gap: float = 0.5,
    lines: list[tuple[float, str]] | None = None,
) -> dict:
    """The sweep's phases with each device's busy and idle seconds (see the module's docstring). Epoch seconds in;
    seconds from `start` out. `lines`: (epoch, text) of the sweep's output, each phase keeps the lines it saw."""
    run_dir = Path(run_dir)
    trials = stored_trials(run_dir)
    if not trials:
        return {"error": f"{run_dir} has no stored trials"}
    if start is None:
        recipe = run_dir / "recipe.yaml"
        start = recipe.stat().st_mtime if recipe.is_file() else min(t["start"] for t in trials)
    last = max(t["end"] for t in trials)
    end = last if end is None else end
    devices = sorted({t["device"] for t in trials})
    busy = {d: union([(t["start"], t["end"]) for t in trials if t["device"] == d]) for d in devices}
    anywhere = union([s for spans in busy.values() for s in spans])
    stretches: list[list[float]] = []
    for a, b in anywhere:
        if stretches and a - stretches[-1][1] < gap:
            stretches[-1][1] = b
        else:
            stretches.append([a, b])
    first = stretches[0][0]
    bounds = [("start-up", start, first)]
    for i, (a, b) in enumerate(stretches):
        if i:
            bounds.append((f"wait {i}", stretches[i - 1][1], a))
        bounds.append((f"run {i + 1}", a, b))
    bounds.append(("wind-down", stretches[-1][1], end))
    if answer is not None:
        bounds.append(("fit + transfer", end, answer))
    r = lambda x: round(x, 2)  # noqa: E731
    phases = []
    for name, a, b in bounds:
        length = max(0.0, b - a)
        row = {"phase": name, "from_s": r(a - start), "to_s": r(b - start), "s": r(length),
               "busy_s": {d: r(overlap(busy[d], a, b)) for d in devices},
               "trials_ended": sum(a < t["end"] <= b for t in trials)}  # fmt: skip
        row["idle_s"] = {d: r(length - row["busy_s"][d]) for d in devices}
        if lines:  # each line with its seconds from `start`; the first four and the last two, so that a phase's
            # end (what the wind-down waited for, say) shows
            seen = [f"{t - start:.2f}  {text}" for t, text in lines if a <= t < b]
            row["output"] = seen if len(seen) <= 6 else [*seen[:4], f"… {len(seen) - 6} more", *seen[-2:]]
        phases.append(row)
    sweep_s = end - start
    per_device = {}
    for d in devices:
        b = overlap(busy[d], start, end)
        mine = [t for t in trials if t["device"] == d]
        per_device[d] = {"trials": len(mine), "units": round(sum(1 / t["batched_with"] for t in mine), 1),
                         "busy_s": r(b), "idle_s": r(sweep_s - b),
                         "busy_share": r(b / sweep_s) if sweep_s else None}  # fmt: skip
    idle_by_kind: dict[str, float] = {}
    for p in phases:
        kind = p["phase"].split(" ")[0] if p["phase"] != "fit + transfer" else p["phase"]
        idle_by_kind[kind] = r(idle_by_kind.get(kind, 0.0) + sum(p["idle_s"].values()) / len(devices))
    return {
        "unit_phases_s": unit_phases(trials),
        "run_dir": str(run_dir), "trials": len(trials), "failed": sum(t["status"] == "failed" for t in trials),
        "sweep_s": r(sweep_s), "answer_s": r(answer - start) if answer is not None else None,
        "gap_s": gap, "devices": per_device, "idle_s_by_kind": idle_by_kind, "phases": phases,
        "units": [[t["device"], r(t["start"] - start), r(t["end"] - start), t["batched_with"]] for t in trials],
        "source": "the trials' own started_at" if all(t["own_start"] for t in trials)
        else "Optuna's datetime_complete less wall_time × batched_with",
    }  # fmt: skip


def unit_phases(trials: list[dict]) -> dict:
    """Slot-seconds summed over the units (a batched unit once), by what the unit was doing (loop.phases: build,
    first_steps = warm-up and capture, steps, after = evaluation and results), and per unit size K: how many
    units and their mean seconds; `kept`: the units that reused a kept unit's model and graph (train/warm.py),
    at most units − `shapes` (the distinct regime, rank and K: each shape's first unit is built); `each`: every
    unit in the order it started, its seconds from the first unit's start, and how many kept units were idle
    when it asked for one and had been freed by then (no room, or memory ran out: why a shape seen before
    was built again; None where the sweep did not record it).
    Units of trials that did not record their phases are counted apart."""
    units = {}
    for t in trials:
        units.setdefault((t["device"], round(t["start"], 3), round(t["end"], 3)), t)
    total: dict[str, float] = {}
    by_k: dict[int, list[float]] = {}
    unknown = 0
    for (_, a, b), t in units.items():
        by_k.setdefault(t["batched_with"], []).append(b - a)
        if not isinstance(t["phases"], dict):
            unknown += 1
            continue
        for k, v in t["phases"].items():
            total[k] = total.get(k, 0.0) + float(v)
    kept = sum(t.get("warm", False) for t in units.values())
    t0 = min((a for _, a, _ in units), default=0.0)
    ordered = sorted(units.items(), key=lambda u: u[0][1])
    each = [[t["device"], t["regime"], t["rank"], t.get("seed"), t["batched_with"], int(t.get("warm", False)),
             round(a - t0, 2), round(b - t0, 2), t.get("kept_idle"), t.get("kept_freed")]
            for (_, a, b), t in ordered]  # fmt: skip
    shapes = len({(t["regime"], t["rank"], t["batched_with"]) for t in units.values()})  # each one's first is built
    ran_out = sum(t.get("ran_out", False) for t in units.values())  # each of these freed every kept unit
    return {"units": len(units), "shapes": shapes, "kept": kept, "ran_out_beside_kept": ran_out,
            "without_phases": unknown,
            "each": {"columns": ["device", "regime", "rank", "seed", "k", "kept", "from_s", "to_s", "kept_idle",
                                 "kept_freed"], "rows": each},  # fmt: skip
            "slot_s": {k: round(v, 2) for k, v in total.items()},
            "by_size": {str(k): {"units": len(v), "mean_s": round(sum(v) / len(v), 2)}
                        for k, v in sorted(by_k.items())}}  # fmt: skip


def render(tl: dict) -> str:
    if "error" in tl:
        return tl["error"]
    devices = list(tl["devices"])
    head = f"{tl['trials']} trials ({tl['failed']} failed), sweep {tl['sweep_s']} s"
    if tl.get("answer_s") is not None:
        head += f", answer at {tl['answer_s']} s"
    lines = [head, ""]
    cols = ["phase", "from s", "to s", "s", "trials ended", *[f"{d} busy / idle s" for d in devices]]
    rows = [[p["phase"], p["from_s"], p["to_s"], p["s"], p["trials_ended"],
             *[f"{p['busy_s'][d]} / {p['idle_s'][d]}" for d in devices]] for p in tl["phases"]]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=True)]
    for row in [cols, *rows]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    lines.append("")
    for d, v in tl["devices"].items():
        share = "—" if v["busy_share"] is None else f"{v['busy_share']:.0%}"
        lines.append(f"{d}: {v['trials']} trials in {v['units']} units, busy {v['busy_s']} s of the sweep's "
                     f"{tl['sweep_s']} s ({share}), idle {v['idle_s']} s")  # fmt: skip
    lines.append("idle seconds by kind of phase (mean over devices): "
                 + ", ".join(f"{k} {v}" for k, v in tl["idle_s_by_kind"].items()))  # fmt: skip
    u = tl.get("unit_phases_s") or {}
    if u.get("slot_s"):
        lines.append(f"{u['units']} units of {u.get('shapes', '?')} shapes ({u.get('kept', 0)} reused a kept one), "
                     "slot-seconds by what they did: "
                     + ", ".join(f"{k} {v}" for k, v in u["slot_s"].items()))  # fmt: skip
    if u.get("by_size"):
        sizes = [f"K={k}: {v['units']} × {v['mean_s']} s" for k, v in u["by_size"].items()]
        lines.append("units by trials per pass: " + ", ".join(sizes))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--start", type=float, help="the sweep's start, epoch seconds (default: recipe.yaml's mtime)")
    ap.add_argument("--end", type=float, help="the sweep command's end, epoch seconds (default: the last store)")
    ap.add_argument("--answer", type=float, help="when `mua transfer` answered, epoch seconds")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds of all devices idle that split two runs")
    ap.add_argument("--json", action="store_true", help="print the timeline as JSON")
    args = ap.parse_args()
    tl = timeline(args.run_dir, args.start, args.end, args.answer, args.gap)
    print(json.dumps(tl, indent=1) if args.json else render(tl))
    if "error" in tl:
        raise SystemExit(2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
