#!/usr/bin/env python3
"""How many trials the embedded default's sweep (recipes/tiny.yaml) runs under each planner, and what its fit
says then, replayed from a stored run of the whole 72-trial sweep (no training: seconds).

Trials are deterministic on one machine: the same (regime, rank, lr, seed) gives the same result, so a planner
that asks only for trials the stored run holds can be replayed from it exactly. Each plan runs the sweep's own
planner (sweep/plan.py) against slots that answers from the stored run, then fits
the replayed store as `mua fit` and `mua transfer --to full-ft` / `--to 128` do. Each plan is replayed twice:
round by round (plan.Planner.next_round, as a shared study's planner runs it) and as the local sweep streams it
(stream.Sweep: each group's next trials as soon as its own are in); both must ask for the same trials and fit the
same. The sweep's wall time is estimated from the stored trials' own wall times on two slots (this 2-core
machine): round by round, each round waiting for its last trial; streamed, each slot taking the next queued
trial as it frees up. `--synthetic N` (48) compares the old planner and this branch's on N synthetic sweeps (random loss
curves, several recipes: seeds, full finetuning, extensions). `--real RUN` also fits a run folder swept for real
with the current planner and checks that it equals the replay of the chosen plan.

Run: `python benchmarks/default_plan.py [--recipe tiny] [--stored /tmp/warm-run [--sweep-stored]] [--real RUN
[--real-wall-s S]] [--out FILE]`. `--sweep-stored` first sweeps the stored run for real into `--stored` with the
old planner (the whole grid 2^-10:2^-4 first, extra seeds at 3 LRs: a superset of every plan's trials), timed as
`old_planner_wall_s`. `--recipe regression`: the same for tests/test_regression.py's reduced default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mua_cli import api  # noqa: E402
from mua_cli.spec.recipe import load_recipe  # noqa: E402
from mua_cli.spec.trial import TrialResult  # noqa: E402
from mua_cli.sweep import grid, plan, stream  # noqa: E402
from mua_cli.sweep.plan import meta  # noqa: E402
from mua_cli.sweep.sizing import Execution  # noqa: E402
from mua_cli.sweep.store import TrialStore, frame  # noqa: E402

SLOTS = 2


class Missing(Exception):
    pass


class Replay:
    """Slots answering from the stored run, on SLOTS simulated slots: `submit` queues trials at the simulated now,
    `next` hands back the one that finishes first (each queued trial starts on the slot free first). It records
    the batches it was given."""

    def __init__(self, stored: dict[str, TrialResult]):
        self.stored, self.rounds = stored, []
        self.now, self.free, self.queue, self.running = 0.0, [0.0] * SLOTS, [], []

    def submit(self, specs, spare=()):
        missing = [s.label for s in specs if s.key not in self.stored]
        if missing:
            raise Missing(missing)
        self.rounds.append(list(specs))
        self.queue.extend(specs)
        return [[s] for s in specs]

    def next(self):
        while self.queue:  # every queued trial to the slot free first, from now on
            i = self.free.index(min(self.free))
            spec = self.queue.pop(0)
            self.free[i] = max(self.free[i], self.now) + self.stored[spec.key].wall_time
            self.running.append((self.free[i], spec))
        self.running.sort(key=lambda t: t[0])
        self.now, spec = self.running.pop(0)
        return spec, self.stored[spec.key]

    def close(self, interrupted=False):
        pass


def stored_results(run_dir: Path) -> dict[str, TrialResult]:
    out = {}
    for t in TrialStore.open(run_dir).trials():
        a = t.user_attrs
        metric = math.inf if a["status"] == "diverged" else a["metric"]
        out[a["key"]] = TrialResult(a["status"], metric, a.get("loss_curve", []), a.get("eval_loss"),
                                    a.get("initial_loss"), a.get("wall_time", 0.0))  # fmt: skip
    return out


OLD_GRID = "2^-10:2^-4"  # tiny.yaml's grid before the 52-trial plan
PLANS = {
    "old: the whole grid first, extra seeds at 3 LRs": dict(coarse_min=10**9, extra_lrs=3, lrs=OLD_GRID),
    "before: every other LR first, then fill, extra seeds at 3 LRs": dict(extra_lrs=3, lrs=OLD_GRID),
    "not chosen: extra seeds at 2 LRs": dict(extra_lrs=2, lrs=OLD_GRID),
    "not chosen: extra seeds at 3 LRs, one round of extra seeds only": dict(extra_lrs=3, once=True, lrs=OLD_GRID),
    "not chosen: extra seeds at 2 LRs, one round of extra seeds only": dict(extra_lrs=2, once=True, lrs=OLD_GRID),
    "not chosen: extra seeds at 3 LRs, grid 2^-9:2^-4": dict(extra_lrs=3),
    "chosen: extra seeds at 2 LRs, grid 2^-9:2^-4 (the recipe's, EXTRA_LRS)": dict(),
}
CHOSEN = "chosen: extra seeds at 2 LRs, grid 2^-9:2^-4 (the recipe's, EXTRA_LRS)"


@contextlib.contextmanager
def planner(coarse_min=None, extra_lrs=None, once=False):
    saved = grid.COARSE_MIN, plan.EXTRA_LRS, plan.Planner.extra_seeds
    grid.COARSE_MIN = grid.COARSE_MIN if coarse_min is None else coarse_min
    plan.EXTRA_LRS = plan.EXTRA_LRS if extra_lrs is None else extra_lrs
    if once:  # one round of extra seeds only: none once any group has one

        def extra_once(self, frame):
            return [] if self.has_extra else saved[2](self, frame)

        plan.Planner.extra_seeds = extra_once
    try:
        yield
    finally:
        grid.COARSE_MIN, plan.EXTRA_LRS, plan.Planner.extra_seeds = saved


def _store(recipe, out_dir: Path, info: dict) -> TrialStore:
    store = TrialStore.create(out_dir)
    stream._pin_recipe(out_dir, recipe)
    stream._pin_study(store, recipe)
    store.set_info(**info)  # what the stored sweep recorded (max_lora_rank: `--to 128` is checked against it)
    return store


def replay_rounds(recipe, slots: Replay, out_dir: Path, info: dict) -> tuple[Replay, list[str]]:
    """Round by round: each round's trials all in before the next is planned (a shared study's planner)."""
    store = _store(recipe, out_dir, info)
    p = plan.Planner(recipe, set())
    pending = p.first()
    while pending:
        slots.submit(pending)
        for _ in pending:
            spec, result = slots.next()
            store.add(spec, result, meta(recipe, spec))
            p.done.add(spec.key)
            p.record(spec, result)
        pending = p.next_round(lambda: frame(store))
    return slots, p.decisions.added


def replay(recipe, slots: Replay, out_dir: Path, info: dict) -> tuple[Replay, stream.SweepSummary]:
    """As `mua sweep` streams it (stream.Sweep), against the replaying slots."""
    store = _store(recipe, out_dir, info)
    sweep = stream.Sweep(recipe, store, set(), stream.SweepSummary(out_dir), stream.Listener(), Execution())
    sweep.stream(slots, sweep.start())
    return slots, sweep.summary


def answers(run_dir: Path, rank: int = 128) -> dict:
    """What `mua fit --json` and `mua transfer --to full-ft|RANK --json` report, reduced to the science."""
    res = api.fit(run_dir)
    doc = res.to_dict()
    out: dict = {"groups": {}, "regimes": {}, "transfer": {}}
    for o in doc["optima"]:
        out["groups"][f"{o['regime']} r={o['rank']}"] = {
            "log2_lr_star": o["log2_lr_star"],
            "log2_interval": [round(math.log2(o["lo"]), 4), round(math.log2(o["hi"]), 4)],
            "width_octaves": round(math.log2(o["hi"] / o["lo"]), 4),
        }
    for name, r in doc["regimes"].items():
        out["regimes"][name] = {"slope": r["slope"], "slope_interval": r["slope_interval"]}
    for to in ("full-ft", rank):
        p = api.predict(res, to).to_dict()
        out["transfer"][str(to)] = {"lr": p["lr"], "interval": p["interval"]}
    out["noise_sd"], out["noise_dof"] = doc["noise_sd"], doc["noise_dof"]
    return out


def makespan(rounds, stored) -> float:
    total = 0.0
    for r in rounds:
        free = [0.0] * SLOTS
        for s in r:  # in order, each to the slot free first, as the pool hands them out
            i = free.index(min(free))
            free[i] += stored[s.key].wall_time
        total += max(free)
    return total


def differences(new: dict, ref: dict) -> dict:
    """new − ref: log2 η* and interval ends per group (octaves), slopes, transfer ratios."""
    out: dict = {"groups": {}, "regimes": {}, "transfer": {}}
    for g, r in ref["groups"].items():
        n = new["groups"][g]
        out["groups"][g] = {
            "log2_lr_star": round(n["log2_lr_star"] - r["log2_lr_star"], 4),
            "log2_interval": [round(a - b, 4) for a, b in zip(n["log2_interval"], r["log2_interval"], strict=True)],
            "width_octaves": round(n["width_octaves"] - r["width_octaves"], 4),
        }
    for name, r in ref["regimes"].items():
        n = new["regimes"][name]
        gaps = zip(n["slope_interval"], r["slope_interval"], strict=True)
        out["regimes"][name] = {"slope": round(n["slope"] - r["slope"], 4),
                                "slope_interval": [round(a - b, 4) for a, b in gaps]}  # fmt: skip
    for to, r in ref["transfer"].items():
        n = new["transfer"][to]
        out["transfer"][to] = {"lr_ratio": round(n["lr"] / r["lr"], 4),
                               "interval_ratio": [round(a / b, 4) for a, b in
                                                  zip(n["interval"], r["interval"], strict=True)]}  # fmt: skip
    return out


class Synthetic(Replay):
    """Slots answering with a synthetic loss: any trial, no training, in the order queued."""

    def __init__(self, loss):
        super().__init__({})
        self.loss = loss

    def submit(self, specs, spare=()):
        self.rounds.append(list(specs))
        self.queue.extend(specs)
        return [[s] for s in specs]

    def next(self):
        spec = self.queue.pop(0)
        return spec, self.loss(spec)


def synthetic_loss(case: int):
    """A loss curve per (regime, rank): a random optimum moving with rank, curvature, asymmetry, noise, seed
    shift, and divergence some octaves above the optimum."""
    import numpy as np

    rng = np.random.default_rng(case)
    opt = {"A:r": rng.uniform(-9, -3.5), "B:1": rng.uniform(-9, -5), "full": rng.uniform(-11, -7)}
    slope, curv, asym = rng.uniform(-0.6, 0.2), rng.uniform(0.01, 0.08), rng.uniform(1, 4)
    noise, gap = rng.uniform(0.002, 0.03), rng.uniform(1.5, 4)

    def loss(spec) -> TrialResult:
        x = math.log2(spec.lr)
        o = opt[spec.regime] + (slope * math.log2(spec.rank / 4) if spec.rank else 0.0)
        if x > o + gap:
            return TrialResult("diverged", math.inf)
        d = x - o
        jitter = noise * np.random.default_rng([case, spec.rank, spec.seed, int(1e6 * x) % 2**31,
                                                 ("A:r", "B:1", "full").index(spec.regime)]).normal()  # fmt: skip
        return TrialResult("ok", 2.0 + curv * d * d * (asym if d > 0 else 1.0) + 0.05 * spec.seed + jitter)

    return loss


SYNTHETIC_RECIPES = [
    dict(lrs="2^-10:2^-4"),
    dict(lrs="2^-12:2^-2", seeds=2),
    dict(lrs="2^-14:2^-4", ranks="4,16,full"),
    dict(lrs="2^-9:2^-3", max_extend=2),
]


def synthetic_exactness(cases: int, work: Path) -> dict:
    """Old planner against this branch's on synthetic sweeps: trials each, and whether every fit agrees."""
    from mua_cli.science.fit import fit_run
    from mua_cli.sweep.store import load_trials

    rows = []
    for case in range(cases):
        kw = {"ranks": "4,16,64", "regimes": "A:r,B:1", **SYNTHETIC_RECIPES[case % len(SYNTHETIC_RECIPES)]}
        recipe, loss, out = load_recipe("tiny", **kw), synthetic_loss(case), {}
        for name, how in (("old", dict(coarse_min=10**9)), ("new", {})):
            folder = work / f"synthetic-{name}"
            shutil.rmtree(folder, ignore_errors=True)
            with planner(**how):
                replay(recipe, Synthetic(loss), folder, {})
            df = load_trials(folder)
            fit = {(o.regime, o.rank): (o.lr_star, o.lo, o.hi, o.reason) for o in fit_run(df).optima}
            out[name] = (len(df), fit)
        rows.append({"case": case, "recipe": kw, "old_trials": out["old"][0], "new_trials": out["new"][0],
                     "same_fit": out["old"][1] == out["new"][1]})  # fmt: skip
    return {"cases": len(rows), "same_fit": sum(r["same_fit"] for r in rows), "rows": rows}


def sweep_stored(recipe: str, out: Path) -> float:
    """The old planner's sweep of `recipe` into `out`, for real, through the command line; its wall seconds."""
    import time

    from typer.testing import CliRunner

    from mua_cli.ui.cli import app

    if out.exists():
        raise SystemExit(f"{out} exists: --sweep-stored makes a new run folder")
    w0 = time.perf_counter()
    with planner(coarse_min=10**9, extra_lrs=3):
        res = CliRunner().invoke(app, ["sweep", "--recipe", recipe, "--out", str(out), "--lrs", OLD_GRID, "--quiet"])
    if res.exit_code != 0:
        raise SystemExit(f"the stored run's sweep failed: {res.output}")
    return round(time.perf_counter() - w0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--recipe",
        default="tiny",
        help="the recipe swept: a name, a path, or 'regression' (the one of tests/test_regression.py)",
    )
    ap.add_argument("--stored", default="/tmp/warm-run", help="a run folder of the recipe's sweep by the old planner")
    ap.add_argument("--sweep-stored", action="store_true", help="sweep --stored first, with the old planner")
    ap.add_argument("--real", help="a run folder swept for real by the current planner, to check against")
    ap.add_argument("--real-wall-s", type=float, help="the real run's `time` (real), to record with it")
    ap.add_argument("--old-wall-s", type=float, help="a real run of the old planner's `time` (real), to record")
    ap.add_argument("--synthetic", type=int, default=48, help="synthetic sweeps to compare the planners on")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "default_plan.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="default-plan-"))
    try:
        path = args.recipe
        if args.recipe == "regression":
            sys.path.insert(0, str(ROOT / "tests"))
            import yaml
            from test_regression import RECIPE

            path = work / "regression.yaml"
            path.write_text(yaml.safe_dump(RECIPE))
        if args.sweep_stored:
            args.old_wall_s = sweep_stored(str(path), Path(args.stored))
        source = work / "stored"
        shutil.copytree(args.stored, source)  # read from a copy: the stored run is left as it is
        stored = stored_results(source)
        info = {k: v for k, v in TrialStore.open(source).info().items() if k == "max_lora_rank"}
        rank = min(128, info.get("max_lora_rank", 128))  # the largest rank `mua transfer --to` takes, up to 128
        ref = answers(source, rank)
        result: dict = {"recipe": args.recipe, "stored_run": args.stored, "stored_trials": len(stored),
                        "old_planner_wall_s": args.old_wall_s, "stored_fit": ref, "plans": {}}  # fmt: skip
        for name, how in PLANS.items():
            how = dict(how)
            recipe = load_recipe(str(path), **({"lrs": how.pop("lrs")} if "lrs" in how else {}))
            folder = work / f"plan{len(result['plans'])}"
            with planner(**how):
                try:
                    rounds, added = replay_rounds(recipe, Replay(stored), folder, info)
                    streamed, summary = replay(recipe, Replay(stored), work / f"stream{len(result['plans'])}", info)
                except Missing as e:
                    result["plans"][name] = {"missing": e.args[0]}
                    continue
            got = answers(folder, rank)
            got_streamed = answers(work / f"stream{len(result['plans'])}", rank)
            keys = sorted(s.key for r in rounds.rounds for s in r)
            result["plans"][name] = {
                "lrs": recipe.sweep.lrs,
                "trials": len(keys),
                "rounds": [len(r) for r in rounds.rounds],
                "added": added,
                "trial_seconds_two_slots": round(makespan(rounds.rounds, stored), 1),
                "streamed_trial_seconds_two_slots": round(streamed.now, 1),
                "streamed_same_trials": sorted(s.key for r in streamed.rounds for s in r) == keys,
                "streamed_same_fit": got_streamed == got,
                "fit": got,
                "minus_stored": differences(got, ref),
                "same_as_stored": got == ref,  # every η*, interval, slope, transfer and the noise, to the digit
            }
        if args.real:
            real = answers(Path(args.real), rank)
            chosen = result["plans"][CHOSEN]["fit"]
            result["real_run"] = {
                "run": args.real,
                "wall_s": args.real_wall_s,
                "equals_replay_of_chosen": real == chosen,
                "fit": real,
            }
        if args.synthetic:
            result["synthetic"] = synthetic_exactness(args.synthetic, work)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"{'plan':82} {'trials':>6} {'rounds s':>8} {'stream s':>8}  same fit  streamed: same trials, fit")
        for name, p in result["plans"].items():
            if "missing" in p:
                print(f"{name:82} needs trials the stored run lacks: {p['missing'][:3]}")
                continue
            print(f"{name:82} {p['trials']:>6} {p['trial_seconds_two_slots']:>8} "
                  f"{p['streamed_trial_seconds_two_slots']:>8}  {str(p['same_as_stored']):8}  "
                  f"{p['streamed_same_trials']}, {p['streamed_same_fit']}")  # fmt: skip
        if args.real:
            same = result["real_run"]["equals_replay_of_chosen"]
            print(f"real run {args.real}: equals the replay of the chosen plan: {same}")
        if args.synthetic:
            syn = result["synthetic"]
            saved = sorted(r["old_trials"] - r["new_trials"] for r in syn["rows"])
            print(
                f"synthetic sweeps: {syn['same_fit']}/{syn['cases']} fit the same under both planners; trials saved "
                f"{saved[0]}–{saved[-1]}, median {saved[len(saved) // 2]}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
