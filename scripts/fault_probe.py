"""Faults injected into real `mua` processes, and what survived each: the probes of issue #29, kept.

    python scripts/fault_probe.py [--markdown] [NAME ...]

runs every probe (or those named) and prints one line per probe, or with --markdown the table that
docs/reliability.md shows. The PostgreSQL probes start a throwaway server through scripts/postgres.sh
(tests/pg_server.py), which installs PostgreSQL where it is missing (apt, as root); without one they are reported
as not run. tests/test_fault_probe.py runs each probe as a test (CI), against its own server.

Every probe exits non-zero (and its row says FAILED) where mua lost, duplicated or corrupted anything, hung, or
left a process behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import yaml  # noqa: E402

RECIPE = {  # tests/conftest.py's micro recipe, three LRs of one rank: a sweep of seconds
    "name": "probe",
    "model": "embedded:tiny",
    "model_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2},
    "pretrain": {"steps": 30, "batch_size": 8, "lr": 0.003},
    "data": "embedded:britannica",
    "seq_len": 32,
    "steps": 12,
    "batch_size": 4,
    "ranks": "2",
    "regimes": "B:1",
    "lrs": "2^-8:2^-6",
    "refine": 0,
    "max_extend": 0,
}  # fmt: skip
FAST_BEAT = {"MUA_HEARTBEAT_S": "1", "MUA_GRACE_S": "3"}  # a trial without a heartbeat for 3 s is stale


@dataclass
class Row:
    fault: str
    survived: str
    ok: bool
    detail: str = ""


@dataclass
class Context:
    work: Path  # an empty folder of the probe's own
    pg: object = None  # tests/pg_server.Server, or None where PostgreSQL cannot be had

    def recipe(self, **changes) -> Path:
        path = self.work / f"recipe-{len(list(self.work.glob('recipe-*')))}.yaml"
        path.write_text(yaml.safe_dump({**RECIPE, **changes}))
        return path


def mua(*args, env: dict | None = None, err=subprocess.PIPE) -> subprocess.Popen:
    """`mua ARGS` in a process of its own (its own session: a kill of it reaches it alone). `err`: where its
    stdout and stderr go (a file, where processes it leaves behind would hold a pipe open)."""
    return subprocess.Popen(
        [sys.executable, "-c", "from mua_cli.ui.cli import main; main()", *map(str, args)],
        stdout=subprocess.PIPE if err is subprocess.PIPE else err, stderr=err, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, start_new_session=True,
    )  # fmt: skip


def run_mua(*args, env: dict | None = None, timeout: float = 600) -> tuple[int, str, str]:
    p = mua(*args, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return -1, out, err + f"\n(timed out after {timeout:g} s)"
    return p.returncode, out, err


def fit_of(run: Path, *extra) -> dict | None:
    rc, out, _ = run_mua("fit", run, "--json", "--no-plot", *extra)
    return json.loads(out) if rc == 0 else None


def trial_keys(url: str, study: str | None = None) -> list[str]:
    """`study`: by default the storage's one study (a run folder's study is named after the folder)."""
    import optuna

    if study is None:
        (study,) = optuna.get_all_study_names(storage=url)
    s = optuna.load_study(study_name=study, storage=url)
    return [t.user_attrs["key"] for t in s.get_trials(deepcopy=False) if t.state.is_finished() and t.state.name ==
            "COMPLETE"]  # fmt: skip


def sweep_once(ctx: Context, run: Path, recipe: Path) -> None:
    rc, out, err = run_mua("sweep", "--recipe", recipe, "--out", run, "--device", "cpu", "--quiet")
    if rc:
        raise RuntimeError(f"the probe's own sweep failed: {err[-2000:]}")


# ------------------------------------------------------------------------------------------------------ probes


def kill_during_write(ctx: Context) -> Row:
    """A process SIGKILLed inside a write transaction of the run's trials.db, after it changed pages in the file
    (what `kill -9` of a sweep storing a trial leaves): a hot journal, `trials.db-journal`."""
    run, recipe = ctx.work / "run", ctx.recipe()
    sweep_once(ctx, run, recipe)
    before, keys = fit_of(run), sorted(trial_keys(f"sqlite:///{run}/trials.db"))
    writer = (
        "import os, signal, sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "con.execute('PRAGMA cache_size = 1')\n"  # every changed page spills into the file before a commit
        "con.execute('BEGIN IMMEDIATE')\n"
        "con.execute('UPDATE trial_user_attributes SET value_json = value_json')\n"
        "con.execute('CREATE TABLE pad (x)')\n"
        "con.executemany('INSERT INTO pad VALUES (?)', [('x' * 500,)] * 300)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(run / "trials.db")], check=False)
    journal = (run / "trials.db-journal").is_file()
    after = fit_of(run)
    rc, _, err = run_mua("sweep", "--recipe", recipe, "--out", run, "--device", "cpu", "--quiet")
    again = sorted(trial_keys(f"sqlite:///{run}/trials.db"))
    ok = journal and after == before and rc == 0 and again == keys
    return Row("`kill -9` inside a write transaction of `trials.db` (a hot journal left)",
               f"all {len(keys)} trials; `mua fit` rolls the write back (as `sqlite3` does) and gives the same fit "
               "byte for byte; the same sweep resumes with nothing to run", ok,
               f"journal left: {journal}; fit equal: {after == before}; resume rc {rc}: "
               f"{err.strip()[-300:]}")  # fmt: skip


def _descendants(pid: int, depth: int = 99) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [(pid, 0)]
    while todo:
        here, d = todo.pop()
        for c in children.get(here, []) if d < depth else []:
            out.add(c)
            todo.append((c, d + 1))
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _parent_death(ctx: Context, sig: int) -> tuple[bool, str, int, str]:
    """A sweep with worker processes, stopped by `sig` once its workers run; whether every one of them is gone
    within 20 s of it, and what the sweep said."""
    # far longer than the wait before the signal on any machine: a sweep that ends first proves nothing (at 400
    # steps one finished within it on a fast 2-core machine)
    recipe = ctx.recipe(steps=20000, lrs="2^-12:2^-9", ranks="2,4")
    log = ctx.work / f"sweep-{sig}.log"
    with open(log, "w") as f:
        p = mua("sweep", "--recipe", recipe, "--out", ctx.work / f"run-{sig}", "--device", "cpu", "--workers-per-gpu",
                2, "--quiet", err=f)  # fmt: skip
    end, workers = time.monotonic() + 240, set()
    while not workers and time.monotonic() < end and p.poll() is None:
        # the forkserver and the resource tracker are the sweep's children from its start; workers, the forkserver's
        workers = _descendants(p.pid) - _descendants(p.pid, depth=1)
        time.sleep(0.5)
    if not workers:
        os.kill(p.pid, signal.SIGKILL)
        return False, "no worker process started", p.wait(), log.read_text()[-500:]
    time.sleep(3)  # the workers load their model and take units
    workers = _descendants(p.pid)
    os.kill(p.pid, sig)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    err = log.read_text()
    end = time.monotonic() + 20
    while _alive(workers) and time.monotonic() < end:
        time.sleep(0.2)
    left = _alive(workers)
    for pid in left:  # the probe cleans up after a failure
        os.kill(pid, signal.SIGKILL)
    said = (
        f"{len(workers)} processes under the sweep (forkserver, resource tracker, workers), {len(left)} left after 20 s"
    )
    return not left, said, p.returncode, err


def parent_death(ctx: Context) -> Row:
    gone, detail, _, _ = _parent_death(ctx, signal.SIGKILL)
    return Row("`kill -9` of a sweep with worker processes (`--workers-per-gpu 2 --device cpu`)",
               "no process: the workers and their forkserver end with the sweep", gone, detail)  # fmt: skip


def sigterm(ctx: Context) -> Row:
    gone, detail, rc, err = _parent_death(ctx, signal.SIGTERM)
    err = " ".join(err.split())  # rich wraps a long run folder's line
    said = "stopped by SIGTERM" in err and "run the same command to resume" in err
    ok = gone and said and rc == 143
    return Row("SIGTERM to a sweep with worker processes",
               "stops as Ctrl-C does: the workers stopped, `stopped by SIGTERM: finished trials are stored in X; run "
               "the same command to resume`, exit code 143", ok,
               f"{detail}; exit code {rc}; said: {err.strip()[-300:]}")  # fmt: skip


def symlinked_temp_file(ctx: Context) -> Row:
    """Links planted where a run's files are written: the old temporary names and the files themselves."""
    run, recipe = ctx.work / "run", ctx.recipe()
    sweep_once(ctx, run, recipe)
    victims = {}
    for name in ("fit.json.tmp", "recipe.yaml.tmp", "fit.png.tmp", "fit.json"):
        victim = ctx.work / f"victim-{name}.txt"
        victim.write_text("precious\n")
        victims[name] = victim
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(Path("..") / victim.name)
    (run / "recipe.yaml").unlink()  # the sweep writes it again
    rc_fit, _, err_fit = run_mua("fit", run)
    rc_sweep, _, err_sweep = run_mua("sweep", "--recipe", recipe, "--out", run, "--device", "cpu", "--quiet")
    untouched = all(v.read_text() == "precious\n" for v in victims.values())
    written = (run / "fit.json").is_file() and not (run / "fit.json").is_symlink() and (run / "recipe.yaml").is_file()
    ok = untouched and written and rc_fit == 0 and rc_sweep == 0
    return Row("symlinks planted as `fit.json.tmp`, `recipe.yaml.tmp`, `fit.png.tmp` and `fit.json` in a run folder",
               "every file they point to, unchanged; fit.json and recipe.yaml written as files of the run folder",
               ok, f"untouched: {untouched}; written: {written}; fit rc {rc_fit} {err_fit.strip()[-200:]}; sweep rc "
               f"{rc_sweep} {err_sweep.strip()[-200:]}")  # fmt: skip


def _pg_url(ctx: Context, name: str) -> str:
    return ctx.pg.make_database(name)


def _psql(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(sql)


def _finished_once(url: str, study: str, expected: int) -> tuple[bool, str]:
    import optuna

    s = optuna.load_study(study_name=study, storage=url)
    done = [t.user_attrs.get("key") for t in s.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    left = s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))
    ok = len(done) == len(set(done)) == expected and not left and s.user_attrs.get("mua_state") == "done"
    return ok, f"{len(done)} finished ({len(set(done))} keys, {expected} planned), {len(left)} waiting or running"


def failed_heartbeat(ctx: Context) -> Row:
    """PostgreSQL refuses the first heartbeat insert (a trigger), right after a claim flipped a trial to
    RUNNING: the trial must not be left RUNNING without a heartbeat, which no one reaps."""
    import optuna

    url = _pg_url(ctx, "heartbeat")
    optuna.storages.RDBStorage(url).engine.dispose()  # the tables, so that the trigger has one to sit on
    _psql(url, "CREATE SEQUENCE fault_once; "
               "CREATE FUNCTION fail_once() RETURNS trigger AS $$ BEGIN "
               "IF nextval('fault_once') = 1 THEN RAISE EXCEPTION 'injected: heartbeat refused'; END IF; "
               "RETURN NEW; END $$ LANGUAGE plpgsql; "
               "CREATE TRIGGER fail_once BEFORE INSERT ON trial_heartbeats "
               "FOR EACH ROW EXECUTE FUNCTION fail_once()")  # fmt: skip
    rc, out, err = run_mua("sweep", "--recipe", ctx.recipe(), "--storage", url, "--study", "hb", "--device", "cpu",
                           "--quiet", "--out", ctx.work / "hb-run", env=FAST_BEAT, timeout=400)  # fmt: skip
    ok, detail = _finished_once(url, "hb", 3) if rc == 0 else (False, err.strip()[-500:])
    return Row("the first heartbeat after a claim refused by PostgreSQL (a trigger)",
               "every trial, finished once; the planner ends (it hung before)", ok, detail)  # fmt: skip


def running_without_heartbeat(ctx: Context) -> Row:
    """A claim cut off between flipping a trial to RUNNING and its first heartbeat (a worker killed there): a
    RUNNING trial with no heartbeat at all, which Optuna's stale-trial check passes over. The probe flips one
    waiting trial itself, while the planner's first claim is held up for 3 s (a trigger)."""
    import optuna

    fault = "a trial left RUNNING with no heartbeat at all (a claim cut off before its first beat)"
    url = _pg_url(ctx, "noheart")
    optuna.storages.RDBStorage(url).engine.dispose()
    _psql(url, "CREATE SEQUENCE slow_once; "
               "CREATE FUNCTION slow_once() RETURNS trigger AS $$ BEGIN "
               "IF NEW.state = 'RUNNING' AND nextval('slow_once') = 1 THEN PERFORM pg_sleep(3); END IF; "
               "RETURN NEW; END $$ LANGUAGE plpgsql; "
               "CREATE TRIGGER slow_once BEFORE UPDATE ON trials "
               "FOR EACH ROW EXECUTE FUNCTION slow_once()")  # fmt: skip
    log = ctx.work / "planner.log"
    with open(log, "w") as f:
        planner = mua("sweep", "--recipe", ctx.recipe(steps=40), "--storage", url, "--study", "nh", "--device", "cpu",
                      "--quiet", "--out", ctx.work / "nh-run", env=FAST_BEAT, err=f)  # fmt: skip
    stolen, end = None, time.monotonic() + 300
    while stolen is None and time.monotonic() < end and planner.poll() is None:
        try:
            study = optuna.load_study(study_name="nh", storage=url)
            waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if len(waiting) == 3:  # all queued: the last one, which the planner's first claim does not hold
                t = waiting[-1]
                if study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING):  # noqa: SLF001
                    stolen = t._trial_id  # noqa: SLF001
        except (KeyError, optuna.exceptions.UpdateFinishedTrialError):
            pass
        time.sleep(0.1)
    try:
        planner.wait(timeout=400)
    except subprocess.TimeoutExpired:
        os.kill(planner.pid, signal.SIGKILL)
        planner.wait()
        return Row(fault, "", False, f"the planner hung (trial {stolen} RUNNING with no heartbeat)")
    ok, detail = _finished_once(url, "nh", 3) if planner.returncode == 0 else (False, log.read_text()[-500:])
    return Row(fault, "it is reaped after the grace period and runs again; every trial finished once",
               ok and stolen is not None, f"trial {stolen} taken; {detail}")  # fmt: skip


def concurrent_starts(ctx: Context, n: int = 8, rounds: int = 3) -> Row:
    """`n` processes open one shared study at the same instant on a fresh PostgreSQL database (a planner and
    workers started together), `rounds` times: Optuna creates its tables in each."""
    code = (
        "import sys, time; from mua_cli.sweep.shared import SharedStudy\n"
        "at = float(sys.argv[3])\n"
        "time.sleep(max(0.0, at - time.time()))\n"
        "if int(sys.argv[4]) % 2 == 0:\n"
        "    SharedStudy.create(sys.argv[1], sys.argv[2], 'many')\n"  # a planner
        "else:\n"  # a worker: joins once the planner has made the study, as `mua worker --wait` does
        "    from mua_cli.errors import MuaError\n"
        "    for _ in range(600):\n"
        "        try:\n"
        "            SharedStudy.join(sys.argv[1], sys.argv[2], 'many')\n"
        "            break\n"
        "        except MuaError as e:\n"
        "            if 'no study' not in str(e):\n"
        "                raise\n"
        "            time.sleep(0.1)\n"
    )
    failures, shown = 0, ""
    for r in range(rounds):
        url = _pg_url(ctx, f"many{r}")
        at = time.time() + 12  # every process imports first, then all open at once
        procs = [subprocess.Popen([sys.executable, "-c", code, str(ctx.work / f"many{r}-{i}"), url, str(at), str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}) for i in range(n)]  # fmt: skip
        for p in procs:
            _, err = p.communicate(timeout=300)
            if p.returncode:
                failures += 1
                shown = shown or err.strip().splitlines()[-1][:300]
    return Row(f"{n} processes (planners and workers) opening one shared study at once on a fresh PostgreSQL "
               f"database ({rounds} times)",
               "every one starts; Optuna's tables are made once, under an advisory lock", not failures,
               f"{failures} of {n * rounds} failed {shown}")  # fmt: skip


SQLITE_PROBES: dict[str, Callable[[Context], Row]] = {
    "kill_during_write": kill_during_write,
    "parent_death": parent_death,
    "sigterm": sigterm,
    "symlinked_temp_file": symlinked_temp_file,
}
POSTGRES_PROBES: dict[str, Callable[[Context], Row]] = {
    "failed_heartbeat": failed_heartbeat,
    "running_without_heartbeat": running_without_heartbeat,
    "concurrent_starts": concurrent_starts,
}
PROBES = {**SQLITE_PROBES, **POSTGRES_PROBES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *PROBES], help="probes to run (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print docs/reliability.md's table")
    args = parser.parse_args()
    names = args.names or list(PROBES)
    rows, pg, pg_dir, cache = [], None, None, None
    if "MUA_CACHE" not in os.environ:  # the pretrained micro model, shared by the probes, removed at the end
        os.environ["MUA_CACHE"] = cache = tempfile.mkdtemp(prefix="mua-probe-cache-")
    if any(n in POSTGRES_PROBES for n in names):
        from pg_server import PostgresUnavailable, start_server

        pg_dir = tempfile.mkdtemp(prefix="mua-probe-pg-")
        try:
            pg = start_server(pg_dir)
        except PostgresUnavailable as e:
            print(f"PostgreSQL unavailable, its probes not run: {e}", file=sys.stderr)
    try:
        for name in names:
            if name in POSTGRES_PROBES and pg is None:
                continue
            with tempfile.TemporaryDirectory(prefix=f"mua-probe-{name}-") as work:
                t0 = time.monotonic()
                row = PROBES[name](Context(Path(work), pg))
                rows.append((name, row, time.monotonic() - t0))
            if not args.markdown:
                print(f"{'ok' if row.ok else 'FAILED':6} {name} ({rows[-1][2]:.0f} s): {row.detail}", flush=True)
    finally:
        if pg is not None:
            pg.stop()
        for folder in (pg_dir, cache):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    if args.markdown:
        print("| fault injected | what survived | result |\n|---|---|---|")
        for name, row, _ in rows:
            print(f"| {row.fault} | {row.survived} | {'held' if row.ok else 'FAILED'} (`{name}`) |")
    return 0 if all(row.ok for _, row, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
