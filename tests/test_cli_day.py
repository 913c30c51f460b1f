"""The command line in an engineer's day: which run a command read, `RUN=$(mua sweep --quiet)`, logs a CI keeps
(one line per trial, tables never cut), the usual flags (--version, -h, --dry-run, a flag per recipe key), and
the LoraConfig to train with."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEST_RECIPE
from rich.console import Console
from typer.testing import CliRunner

from mua_cli.spec.config import KEYS
from mua_cli.spec.trial import TrialResult, TrialSpec
from mua_cli.ui.cli import app
from mua_cli.ui.progress import RichListener

RECIPE = {**TINY_TEST_RECIPE, "steps": 12, "ranks": "2,8", "regimes": "B:1", "lrs": "2^-8:2^-6", "max_extend": 0,
          "refine": 0}  # fmt: skip


def mua(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def day(tmp_path_factory, model_cache):
    """A folder with a recipe and one swept run under runs/, as a user's project would have; the tests run in it."""
    root = tmp_path_factory.mktemp("day")
    (root / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    before, env = os.getcwd(), os.environ.get("MUA_CACHE")
    os.chdir(root)
    os.environ["MUA_CACHE"] = str(model_cache)
    try:
        res = mua("sweep", "--recipe", "r.yaml", "--device", "cpu", env={"COLUMNS": "40"})
        yield root, res
    finally:
        os.chdir(before)
        if env is None:
            os.environ.pop("MUA_CACHE", None)
        else:
            os.environ["MUA_CACHE"] = env


@pytest.fixture
def in_day(day, monkeypatch):
    monkeypatch.chdir(day[0])
    return day


def test_a_log_gets_one_plain_line_per_trial_and_whole_tables(in_day):
    _, res = in_day
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 6, res.stdout
    pattern = (
        r"trial \d/6: B:1 rank [28] lr 2\^-[678] \(0\.0\d+\) seed 0 (ok|diverged) metric \S+ \d+\.\d s"
        r" · ETA \d:\d\d:\d\d \(about 6 trials in all\)"
    )
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    # a 40-column log (COLUMNS=40): the table's cells fold, none is cut short with an ellipsis ("diver…│")
    assert not re.search(r"…\s*│", res.stdout)
    assert "low edge" in res.stdout or "interior" in res.stdout


def test_a_log_without_columns_is_never_cut(monkeypatch):
    """rich takes 80 columns where stdout is no terminal; mua's output then takes what its lines need."""
    from mua_cli.ui.console import WIDE, stdout_console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert stdout_console().width == WIDE
    monkeypatch.setenv("COLUMNS", "120")
    assert stdout_console().width == 120


def test_sweep_quiet_prints_the_run_folder_alone(in_day):
    res = mua("sweep", "--recipe", "r.yaml", "--device", "cpu", "--quiet")  # all stored: nothing runs
    assert res.exit_code == 0, res.output
    run = res.stdout.strip()
    assert "\n" not in run and Path(run).is_dir() and (Path(run) / "trials.db").is_file()
    assert run.startswith("runs/micro-")


def test_fit_and_transfer_name_the_run_they_read(in_day):
    (run,) = [p for p in Path("runs").iterdir() if (p / "trials.db").is_file()]
    res = mua("fit", "--no-plot")
    assert res.exit_code == 0, res.output
    assert f"run folder {run} (the newest under runs/" in res.stdout
    res = mua("fit", "--json", "--no-plot")
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)  # stdout stays machine-readable; the run is named on stderr
    assert f"run folder {run}" in res.stderr
    res = mua("transfer", "--to", "8", "--quiet")
    assert f"run folder {run}" in res.stderr and f"run folder {run}" not in res.stdout
    if res.exit_code == 0:
        float(res.stdout.strip())
    # a RUN named: nothing to say
    res = mua("fit", run, "--json", "--no-plot")
    assert "run folder" not in res.stderr


def test_version_and_short_help():
    res = mua("--version")
    assert res.exit_code == 0 and re.fullmatch(r"mua \d+\.\d+\.\d+\S*", res.stdout.strip())
    for cmd in ([], ["sweep"], ["fit"], ["transfer"], ["worker"]):
        res = mua(*cmd, "-h")
        assert res.exit_code == 0 and "Usage:" in res.stdout, (cmd, res.output)


def test_every_scalar_recipe_key_has_a_sweep_flag():
    """Every key of the sweep section, and every key of one value (not a mapping or a pair), is a flag."""
    help_text = mua("sweep", "-h", env={"COLUMNS": "200"}).stdout
    for key, k in KEYS.items():
        if k.section == "sweep" or k.kind in (int, float, str, bool):
            assert k.meta["flag"], key
            assert f"--{key.replace('_', '-')}" in help_text, key


def test_dry_run_checks_and_plans_and_writes_nothing(tmp_path, monkeypatch, micro_recipe_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("to be or not to be, that is the question. " * 400)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = mua("sweep", "--recipe", micro_recipe_path, "--data", "data.txt", "--ranks", "2,8,full", "--max-extend", "0",
              "--refine", "0", "--dry-run", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "ok  model embedded:tiny: config read" in out and "ok  data data.txt: 16,800 characters of text" in out
    # the flags reached the recipe: refine 0 runs the whole grid of 5 LRs for A:r, B:1 at 2 ranks and full-ft
    assert "first round: 25 trial(s) over 5 (regime, rank) group(s)" in out
    assert "expected in all: about 25 trial(s)" in out
    gib = r"\d+\.\d\d GiB"
    slot = rf"memory per slot \(the GPU estimate\): LoRA rank 8, 1 trial\(s\) a pass {gib}; full finetuning {gib}"
    assert re.search(slot, out)
    assert re.search(r"estimated time: about \d+\.\d s per trial", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, nothing else
    # a mistake is found before anything would run
    res = mua("sweep", "--recipe", micro_recipe_path, "--ranks", "2,4096", "--dry-run", "--device", "cpu")
    assert res.exit_code == 2 and "rank 4096 is larger than the model's adapted layers allow" in res.output
    res = mua("sweep", "--recipe", micro_recipe_path, "--data", "nope.csv", "--dry-run", "--device", "cpu")
    assert res.exit_code == 2 and "nope.csv" in res.output


def test_transfer_gives_the_whole_lora_config(tmp_path):
    from synthetic import RECIPE as SYN
    from synthetic import trials

    from mua_cli.science.fit import fit_run

    df = trials({"A:r": 0.0, "B:1": 0.0}, seeds=(0, 1), noise=0.003)
    df["recipe"] = [{**SYN, "targets": "q_proj,v_proj", "task": "causal-lm"}] * len(df)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "fit.json").write_text(json.dumps(fit_run(df).to_dict()))
    res = mua("transfer", tmp_path / "run", "--to", "512", "--json")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)["lora_config"]
    assert cfg == {"r": 512, "lora_alpha": 512, "use_rslora": False, "target_modules": ["q_proj", "v_proj"],
                   "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}  # fmt: skip
    from peft import LoraConfig

    LoraConfig(**cfg)  # what the JSON says is a config peft takes as it is
    res = mua("transfer", tmp_path / "run", "--to", "512", env={"COLUMNS": "300"})
    text = " ".join(res.stdout.split())
    assert "target_modules=['q_proj', 'v_proj']" in text and "apply_regime(model, 'B:1')" in text


def _spec(lr=2**-8, key="k1"):
    return TrialSpec("B:1", 16, lr, 0, key)


def test_progress_shows_running_trials_and_an_eta_over_the_whole_sweep(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("mua_cli.ui.progress.time.monotonic", lambda: clock[0])
    buf = io.StringIO()
    listener = RichListener(Console(file=buf, force_terminal=True, width=200), live=True)
    with listener:
        listener.expected(52)
        listener.start(total=18, done=0)
        listener.trial_start(_spec())
        listener.step(40, 3.21)
        rows = [t.description for t in listener.progress.tasks]
        assert any("B:1 r=16 lr=2^-8 seed=0 · step 40 · loss 3.21" in d for d in rows), rows
        clock[0] += 10.0
        listener.trial_done(_spec(), TrialResult("ok", 3.0, wall_time=10.0))
        # 10 s a trial, 51 of the expected 52 to go: not the round's 17
        assert listener.eta_text() == "ETA 0:08:30 (about 52 trials in all)"
        assert all("B:1 r=16" not in t.description for t in listener.progress.tasks)  # done: its row is gone
        # a pool's slots report their units' losses: one row each, while they run
        other = TrialSpec("A:r", 4, 2**-6, 1, "k2")
        listener.loss(_spec(2**-7, "k3"), 20, 2.5)
        listener.loss(other, 30, 1.75)
        rows = [t.description for t in listener.progress.tasks]
        assert any("B:1 r=16 lr=2^-7 seed=0 · step 20 · loss 2.5" in d for d in rows), rows
        assert any("A:r r=4 lr=2^-6 seed=1 · step 30 · loss 1.75" in d for d in rows), rows
    # no estimate from anywhere: the trials planned so far, said to be a floor
    bare = RichListener(Console(file=io.StringIO()), live=False)
    bare.start(total=18, done=0)
    clock[0] += 5.0
    bare.trial_done(_spec(), TrialResult("ok", 3.0))
    assert bare.eta_text() == "ETA ≥ 0:01:25 (the rounds planned so far)"


def test_too_few_finite_lrs_near_the_best_says_how_many_are_near():
    """Seen: 'only 3 … have a finite loss; an optimum needs 3'. The count is of the LRs the fit reads (within
    the window around the best), with the grid's count beside it when they differ."""
    import pandas as pd

    from mua_cli.science.rank_optima import optimum

    grid = [(-14, 3.0, "ok"), (-8, 1.0, "ok"), (-7, 1.5, "ok"), (-6, float("inf"), "diverged")]
    rows = [{"regime": "B:1", "rank": 4, "lr": 2.0**e, "seed": 0, "metric": m, "status": s} for e, m, s in grid]
    o = optimum(pd.DataFrame(rows))
    assert not o.usable
    n = int(re.search(r"only (\d+) learning rates?", o.reason).group(1))
    assert n < 3 and "where an optimum needs 3" in o.reason
    assert "(3 on the whole grid): add LRs between them" in o.reason


def test_a_command_line_mistake_is_one_line_and_mua_alone_is_the_help():
    """What ui/console.py catches through typer's public exception class (no typer._click import)."""
    res = mua()
    assert res.exit_code == 2 and "Usage:" in res.stdout and "sweep" in res.stdout
    for args, message in ((["--bogus"], "No such option: --bogus (see `"),
                          (["sweep", "--steps", "x"], "Invalid value for '--steps'"),
                          (["fit", "--no-such"], "No such option: --no-such")):  # fmt: skip
        res = mua(*args)
        assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
        assert message in res.output, res.output
