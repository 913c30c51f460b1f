"""The command line end to end, and every bad input a user can give: one clear line, exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mua_cli.science import calibration as cal
from mua_cli.ui.cli import app

runner = CliRunner()


def mua(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory, model_cache):
    """One real sweep of the micro recipe, shared by the tests that only read it."""
    import os

    import yaml
    from conftest import TINY_TEST_RECIPE

    os.environ["MUA_CACHE"] = str(model_cache)
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "micro.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_TEST_RECIPE, "steps": 20, "lrs": "2^-11:2^-3", "max_extend": 2}))
    run = root / "run"
    res = mua(
        "sweep", "--recipe", recipe, "--ranks", "2,4,8,full", "--regimes", "A:r,B:1", "--out", run, "--device", "cpu"
    )
    assert res.exit_code == 0, res.output
    return run


def test_sweep_fit_transfer_end_to_end(swept_run):
    res = mua("fit", swept_run)
    assert res.exit_code == 0, res.output
    assert (swept_run / "fit.json").is_file() and (swept_run / "fit.png").stat().st_size > 10_000
    doc = json.loads((swept_run / "fit.json").read_text())
    assert set(doc["regimes"]) == {"A:r", "B:1"}
    assert doc["n_trials"] >= 2 * 3 * 9
    res = mua("transfer", swept_run, "--to", "full-ft", "--json")
    assert res.exit_code == 0, res.output
    pred = json.loads(res.stdout)
    # the run swept full finetuning: its measured optimum is the answer, the prediction is evidence
    assert pred["target"] == "full-ft" and pred["basis"] == "measured"
    assert pred["lr"] == pytest.approx(doc["full"]["lr_star"])
    assert pred["evidence"]["predicted_basis"] == "study-offset" and pred["evidence"]["predicted"] > 0
    lo, hi = pred["interval"]
    assert lo <= pred["lr"] <= hi
    res_q = mua("transfer", swept_run, "--to", "full-ft", "--quiet")
    assert float(res_q.stdout.strip()) == pytest.approx(pred["lr"], rel=1e-4)
    res = mua("transfer", swept_run, "--to", "full-ft")
    assert res.exit_code == 0 and "holds only for the same optimizer" in res.output
    assert "basis: measured" in res.output and "the prediction without these trials" in res.output
    predicted = json.loads(mua("transfer", swept_run, "--to", "full-ft", "--basis", "predict", "--json").stdout)
    assert predicted["basis"] == "study-offset" and predicted["lr"] == pytest.approx(pred["evidence"]["predicted"])
    calibrated = mua("transfer", swept_run, "--to", "full-ft", "--basis", "predict", "--calibrate", swept_run, "--json")
    assert calibrated.exit_code == 0, calibrated.output
    # calibrated on itself: B:1 at the reference rank plus its own offset gives back its own full-ft optimum
    assert json.loads(calibrated.stdout)["lr"] == pytest.approx(pred["lr"], rel=1e-6)
    res = mua("transfer", swept_run, "--to", "full-ft", "--basis", "sideways")
    assert res.exit_code == 2 and "unknown --basis" in res.output


def test_transfer_of_a_fitted_run_reads_fit_json_without_the_store_pandas_or_torch(swept_run):
    """`mua transfer` on a run whose fit.json is current loads neither the trial store's libraries (Optuna,
    SQLAlchemy) nor pandas nor torch: a CI job's call starts in a fraction of the time, with the same answer."""
    assert mua("fit", swept_run).exit_code == 0
    code = (
        "import atexit, sys\n"
        "heavy = ('optuna', 'sqlalchemy', 'pandas', 'torch')\n"
        "atexit.register(lambda: print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr))\n"
        f"sys.argv = ['mua', 'transfer', {str(swept_run)!r}, '--to', 'full-ft', '--quiet']\n"
        "from mua_cli.ui.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"
    in_process = mua("transfer", swept_run, "--to", "full-ft", "--quiet")
    assert float(done.stdout) == float(in_process.stdout)


def test_transfer_to_rank_json_schema(swept_run):
    res = mua("transfer", swept_run, "--to", "32", "--regime", "A:r", "--json")  # the micro model is 32 wide
    assert res.exit_code == 0, res.output
    pred = json.loads(res.stdout)
    for key in ("lr", "interval", "target", "regime", "basis", "settings", "caveat", "reason"):
        assert key in pred
    assert pred["target"] == 32 and pred["basis"] == cal.RANK_BASIS
    assert pred["settings"]["lora_alpha"] == 1 and pred["settings"]["steps"] == 20


@pytest.mark.parametrize(
    "content",
    ['{"optima": [', "[]", "{}", '{"optima": 3, "regimes": {}}', '{"regimes": {"B:1": {"x": 1}}}', "\xff\xfe"],
)
def test_corrupt_fit_json_is_refitted_not_a_crash(swept_run, content):
    path = swept_run / "fit.json"
    path.write_bytes(content.encode("latin-1"))
    later = (swept_run / "trials.db").stat().st_mtime + 60
    os.utime(path, (later, later))  # newer than the store: transfer would trust it if it could read it
    res = mua("transfer", swept_run, "--to", "full-ft", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["basis"] == "measured"
    assert set(json.loads(path.read_text())["regimes"]) == {"A:r", "B:1"}  # rewritten from the trials


def test_resweep_skips_everything(swept_run, tmp_path):
    before = (swept_run / "trials.db").read_bytes()
    recipe = tmp_path / "r.yaml"
    import yaml
    from conftest import TINY_TEST_RECIPE

    recipe.write_text(yaml.safe_dump({**TINY_TEST_RECIPE, "steps": 20, "lrs": "2^-11:2^-3", "max_extend": 2}))
    res = mua(
        "sweep",
        "--recipe",
        recipe,
        "--ranks",
        "2,4,8,full",
        "--regimes",
        "A:r,B:1",
        "--out",
        swept_run,
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    assert "ran 0 trial(s)" in res.output
    assert (swept_run / "trials.db").read_bytes() == before


def test_theory_and_recipes_and_help():
    res = mua("theory")
    assert res.exit_code == 0 and "B:sqrt" in res.output and "-0.25" in res.output and "full finetuning" in res.output
    res = mua("recipes")
    assert res.exit_code == 0 and "tiny" in res.output
    for cmd in ("sweep", "fit", "transfer"):
        res = mua(cmd, "--help")
        assert res.exit_code == 0 and "Examples" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep", "--ranks", "4,x"], "bad rank"),
        (["sweep", "--ranks", "0"], "at least 1"),
        (["sweep", "--regimes", "C:9"], "unknown regime"),
        (["sweep", "--lrs", "2^-4:2^-3"], "at least 3"),
        (["sweep", "--recipe", "no/such/recipe.yaml"], "does not exist"),
        (["sweep", "--recipe", "nosuchrecipe"], "no recipe named"),
        (["sweep", "--device", "tpu"], "unknown device"),
        (["fit", "no/such/run"], "does not exist"),
        (["transfer", "no/such/run"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = mua(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_empty_dataset_and_missing_model(tmp_path, micro_recipe_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    res = mua("sweep", "--recipe", micro_recipe_path, "--out", tmp_path / "r1", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    import yaml

    raw = yaml.safe_load(micro_recipe_path.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "data": str(empty)}))
    res = mua("sweep", "--recipe", bad, "--out", tmp_path / "r2", "--device", "cpu")
    assert res.exit_code == 2 and "empty" in res.output and "Traceback" not in res.output
    bad.write_text(yaml.safe_dump({**raw, "model": str(tmp_path / "no-model")}))
    res = mua("sweep", "--recipe", bad, "--out", tmp_path / "r3", "--device", "cpu")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "r3").exists()  # no empty run folder left to pass for the latest run
    assert (tmp_path / "r1" / "trials.db").is_file()  # an earlier run is untouched
    bad.write_text("steps: [unclosed")
    res = mua("sweep", "--recipe", bad)
    assert res.exit_code == 2 and "YAML" in res.output
    bad.write_text(yaml.safe_dump({**raw, "stepz": 3}))
    res = mua("sweep", "--recipe", bad)
    assert res.exit_code == 2 and "unknown key" in res.output


def test_run_without_trials_and_corrupted_store(tmp_path):
    (tmp_path / "empty-run").mkdir()
    res = mua("fit", tmp_path / "empty-run")
    assert res.exit_code == 2 and "no trial store" in res.output
    bad = tmp_path / "bad-run"
    bad.mkdir()
    garbage = b"this is not a database" * 100
    (bad / "trials.db").write_bytes(garbage)
    for args in (["fit", bad], ["transfer", bad], ["sweep", "--out", bad, "--device", "cpu"]):
        res = mua(*args)
        assert res.exit_code == 2 and "corrupted" in res.output, res.output
    assert (bad / "trials.db").read_bytes() == garbage  # left untouched


def test_full_ft_without_b1_is_a_clear_error(tmp_path, micro_recipe_path):
    run = tmp_path / "run"
    res = mua(
        "sweep",
        "--recipe",
        micro_recipe_path,
        "--ranks",
        "2,4",
        "--regimes",
        "A:r",
        "--out",
        run,
        "--device",
        "cpu",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    res = mua("transfer", run, "--to", "full-ft")
    assert res.exit_code == 2 and "--regimes B:1" in res.output
    res = mua("transfer", run, "--to", "abc")
    assert res.exit_code == 2 and "--to" in res.output
    shutil.rmtree(run)


def test_a_gpu_index_that_does_not_exist_is_one_line(tmp_path, micro_recipe_path):
    res = mua("sweep", "--recipe", micro_recipe_path, "--out", tmp_path / "r", "--device", "cuda:99")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", "ten", "steps must be a whole number"),
        ("steps", 10.5, "steps must be a whole number"),
        ("batch_size", "8", "batch_size must be a whole number"),
        ("betas", 0.9, "betas must be two numbers"),
        ("betas", [0.9, 1.5], "betas must be in [0, 1), not [0.9, 1.5]"),
        ("model_config", 5, "model_config must be a mapping"),
        ("model_config", {"hidden_size": -1}, "hidden_size must be a positive whole number"),
        ("per_layer_lr", "yes", "per_layer_lr must be true or false"),
        ("alpha0", "one", "alpha0 must be a number"),
        ("targets", [1, 2], "targets must be a module name"),
    ],
)
def test_a_recipe_field_of_the_wrong_type_is_one_line_naming_it(field, value, message, tmp_path, micro_recipe_path):
    import yaml

    raw = yaml.safe_load(micro_recipe_path.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, field: value}))
    res = mua("sweep", "--recipe", bad, "--out", tmp_path / "run", "--device", "cpu")
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_unreadable_recipes_runs_and_ranks_are_one_line(tmp_path, micro_recipe_path, monkeypatch):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    res = mua("sweep", "--recipe", binary)
    assert res.exit_code == 2 and "cannot be read" in res.output and "Traceback" not in res.output
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    res = mua("sweep", "--recipe", micro_recipe_path, "--out", a_file, "--device", "cpu")
    assert res.exit_code == 2 and "is a file" in res.output and a_file.read_text() == "x"
    res = mua("sweep", "--ranks", "99999999")
    assert res.exit_code == 2 and "no layer is that wide" in res.output
    monkeypatch.chdir(tmp_path)
    res = mua("transfer", "--to", "1000000000000000000000000000000")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_a_bare_fit_skips_an_empty_newest_run(swept_run, tmp_path, monkeypatch):
    """A sweep killed before its first trial leaves an empty store; `mua fit` takes the newest run with trials."""
    from mua_cli.sweep.store import TrialStore

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(swept_run, tmp_path / "runs" / "good")
    TrialStore.create(tmp_path / "runs" / "killed")  # created, never written
    res = mua("transfer", "--to", "full-ft", "--quiet")
    assert res.exit_code == 0, res.output
    res = mua("transfer", "--to", "1000000000000000000000000000000")
    assert res.exit_code == 2 and "from 1 to" in res.output
