"""Issue 14's last bad inputs: a corrupted trial store, a read-only run folder, a disk that fills, a LoRA rank
larger than the model's layers. Each is one line and exit code 2 with nothing stored touched, and `fit` and
`transfer` read a read-only run.

The tests run as root, where file permissions stop no write, so a read-only folder and a full disk are
simulated where they surface: SQLite itself refuses writes (`PRAGMA query_only`, as on a read-only mount) or
runs out of pages (`PRAGMA max_page_count`), or the DBAPI raises the error a full disk gives mid-sweep; and
Python's file opens under the folder fail with the errno the OS gives."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sqlalchemy import event
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from mua_cli.errors import MuaError
from mua_cli.sweep.store import DB_NAME, TrialStore
from mua_cli.ui.cli import app

runner = CliRunner()
SWEEP = ("--ranks", "2,8,full", "--regimes", "B:1", "--device", "cpu", "--quiet")


def mua(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *words: str) -> str:
    """The command failed as a user's mistake does: exit 2, one `error:` line holding `words`, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    text = " ".join(res.output[res.output.index("error:") :].split())  # rich wraps long lines
    for w in words:
        assert w in text, text
    return text


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, model_cache):
    """One real sweep of the micro recipe (B:1 at ranks 2 and 8, and full finetuning), shared read-only."""
    from conftest import TINY_TEST_RECIPE

    os.environ["MUA_CACHE"] = str(model_cache)
    root = tmp_path_factory.mktemp("bad-inputs")
    recipe = root / "micro.yaml"
    raw = {**TINY_TEST_RECIPE, "steps": 20, "lrs": "2^-12:2^-6", "max_extend": 1, "refine": 0}  # interior optima
    recipe.write_text(yaml.safe_dump(raw))
    run = root / "run"
    res = mua("sweep", "--recipe", recipe, *SWEEP, "--out", run)
    assert res.exit_code == 0, res.output
    return SimpleNamespace(recipe=recipe, run=run)


@pytest.fixture
def run_copy(swept, tmp_path):
    """A copy of the swept run that a test may damage."""
    run = tmp_path / "run"
    shutil.copytree(swept.run, run)
    (run / "fit.json").unlink(missing_ok=True)
    return run


# ------------------------------------------------------------------------------------ a corrupted trial store


def _page_size(b: bytes) -> int:
    size = int.from_bytes(b[16:18], "big")
    return 65536 if size == 1 else size


def _overwrite_mid_page(b: bytearray) -> bytearray:
    ps = _page_size(b)
    start = (len(b) // ps // 2) * ps  # a page in the middle of the file, from its header on
    b[start : start + 100] = b"\xff" * 100
    return b


def _garble_a_trial(b: bytearray) -> bytearray:
    """One trial's stored JSON made unparseable: SQLite's pages stay whole, so only reading the trials shows it."""
    i = b.find(b'"ok"')
    assert i > 0
    b[i] = ord("#")
    return b


CORRUPTIONS = {
    "bytes overwritten mid-file": _overwrite_mid_page,
    "truncated to half": lambda b: b[: len(b) // 2],
    "truncated mid-page": lambda b: b[: len(b) // 2 + 1234],
    "a trial's data garbled": _garble_a_trial,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupted_store_is_one_line_and_left_untouched(swept, run_copy, how):
    db = run_copy / DB_NAME
    db.write_bytes(bytes(CORRUPTIONS[how](bytearray(db.read_bytes()))))
    before = snapshot(run_copy)
    for args in (
        ["sweep", "--recipe", swept.recipe, *SWEEP, "--out", run_copy],  # resume into it
        ["fit", run_copy],
        ["transfer", run_copy, "--to", "256"],
        ["transfer", run_copy, "--to", "full-ft", "--json"],
    ):
        one_line_error(mua(*args), f"run folder {run_copy}", "trials.db is corrupted or not an SQLite database")
        assert snapshot(run_copy) == before, args  # not a byte changed, no journal or fit.json left


def test_a_bare_fit_passes_over_a_corrupted_newest_run(swept, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(swept.run, tmp_path / "runs" / "good")
    bad = tmp_path / "runs" / "bad"
    shutil.copytree(swept.run, bad)
    db = bad / DB_NAME
    db.write_bytes(bytes(_overwrite_mid_page(bytearray(db.read_bytes()))))
    res = mua("transfer", "--to", "full-ft", "--quiet")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------ a read-only run folder


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(folder)`: from now on the folder is as on a read-only mount. SQLite refuses every write on every
    connection, and opening a file under the folder for writing, renaming or removing one fails with EROFS."""
    folders: list[Path] = []
    real_open, real_io_open, real_replace, real_unlink = builtins.open, io.open, os.replace, os.unlink
    real_os_open = os.open

    def inside(path) -> bool:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except TypeError:  # a file descriptor
            return False
        return any(p.is_relative_to(f) for f in folders)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def guarded(real):
        def opener(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and inside(file):
                refuse(file)
            return real(file, mode, *args, **kwargs)

        return opener

    def no_query_writes(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA query_only = ON")

    def os_open(path, flags, *args, **kwargs):  # tempfile.mkstemp's way in (mua_cli/atomic.py)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "replace", lambda a, b, **k: refuse(b) if inside(a) or inside(b) else real_replace(a, b))
    monkeypatch.setattr(os, "unlink", lambda p, **k: refuse(p) if inside(p) else real_unlink(p, **k))
    event.listen(Engine, "connect", no_query_writes)
    yield lambda folder: folders.append(Path(folder).resolve())
    event.remove(Engine, "connect", no_query_writes)


def test_fit_and_transfer_read_a_read_only_run(run_copy, read_only):
    before = snapshot(run_copy)
    read_only(run_copy)
    res = mua("fit", run_copy)
    assert res.exit_code == 0, res.output
    assert "B:1" in res.output and "fit.json not saved" in res.output and "Read-only file system" in res.output
    res = mua("fit", run_copy, "--json")
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["regimes"]) == {"B:1"}
    res = mua("transfer", run_copy, "--to", "full-ft", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["basis"] == "measured"
    res = mua("transfer", run_copy, "--to", "16", "--quiet")
    assert res.exit_code == 0 and float(res.stdout) > 0, res.output
    assert snapshot(run_copy) == before


def test_transfer_reads_a_read_only_run_with_its_fit_cached(swept, run_copy, read_only):
    assert mua("fit", run_copy, "--no-plot").exit_code == 0
    before = snapshot(run_copy)
    read_only(run_copy)
    res = mua("transfer", run_copy, "--to", "full-ft", "--json")
    assert res.exit_code == 0, res.output
    assert "not saved" not in res.output  # fit.json is newer than the store: read, not refitted
    assert snapshot(run_copy) == before


def test_the_store_is_opened_read_only_where_only_read(run_copy):
    """Not by permissions (root ignores them) but by SQLite's mode=ro: a write on the reading store fails."""
    before = snapshot(run_copy)
    store = TrialStore.open(run_copy)
    assert store.trials() and store.info()["max_lora_rank"] == 32
    with pytest.raises(Exception) as failed:
        store.study.set_user_attr("x", 1)
    assert "attempt to write a readonly database" in str(failed.value.__cause__)
    assert snapshot(run_copy) == before


def test_a_sweep_into_a_read_only_run_is_one_line(swept, run_copy, read_only, monkeypatch):
    before = snapshot(run_copy)
    read_only(run_copy)
    res = mua("sweep", "--recipe", swept.recipe, *SWEEP, "--out", run_copy)
    one_line_error(res, f"run folder {run_copy} is read-only", "attempt to write a readonly database", "--out")
    assert snapshot(run_copy) == before
    real_access = os.access  # on a real read-only mount, access() says so before SQLite is asked

    def access(path, mode, **kwargs):
        ours = Path(path).resolve().is_relative_to(run_copy.resolve())
        return False if ours and mode & os.W_OK else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    one_line_error(mua("sweep", "--recipe", swept.recipe, *SWEEP, "--out", run_copy), "is read-only")
    assert snapshot(run_copy) == before


def test_a_sweep_under_a_read_only_folder_is_one_line(swept, tmp_path, monkeypatch):
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(tmp_path / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    res = mua("sweep", "--recipe", swept.recipe, *SWEEP, "--out", tmp_path / "ro" / "run")
    one_line_error(res, "cannot create the run folder", "Read-only file system")


# ----------------------------------------------------------------------------------------- a disk that fills


SMALL = ("--ranks", "2", "--regimes", "B:1", "--lrs", "2^-8:2^-6", "--device", "cpu")


@pytest.fixture
def small_recipe(micro_recipe_path, tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(micro_recipe_path.read_text()), "max_extend": 0, "refine": 0}))
    return path


def _stored(run: Path) -> dict[str, float]:
    return {t.user_attrs["key"]: t.user_attrs["metric"] for t in TrialStore.open(run).trials()}


def test_a_disk_that_fills_mid_sweep_is_one_line_and_the_rerun_resumes(small_recipe, tmp_path, monkeypatch):
    """The third trial's INSERT gets SQLite's SQLITE_FULL, raised by the DBAPI where a full disk raises it."""
    run = tmp_path / "run"
    stored = {"n": 0, "full": False}
    real_add = TrialStore.add

    def add(self, *args, **kwargs):
        real_add(self, *args, **kwargs)
        stored["n"] += 1
        stored["full"] = stored["n"] >= 2

    def disk_full(conn, cursor, statement, parameters, context, executemany):
        if stored["full"] and statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(TrialStore, "add", add)
    event.listen(Engine, "before_cursor_execute", disk_full)
    try:
        res = mua("sweep", "--recipe", small_recipe, *SMALL, "--out", run)
    finally:
        event.remove(Engine, "before_cursor_execute", disk_full)
    one_line_error(
        res, f"cannot write the trial store {run / DB_NAME}", "disk full (database or disk is full)", "to resume"
    )
    con = sqlite3.connect(f"file:{run / DB_NAME}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()
    first = _stored(run)
    assert len(first) == 2
    monkeypatch.setattr(TrialStore, "add", real_add)
    res = mua("sweep", "--recipe", small_recipe, *SMALL, "--out", run)
    assert res.exit_code == 0, res.output
    assert "ran 1 trial(s)" in res.output and "skipped 2" in res.output
    resumed = _stored(run)
    assert {k: resumed[k] for k in first} == first  # the trials stored before the disk filled, as they were
    res = mua("sweep", "--recipe", small_recipe, *SMALL, "--out", tmp_path / "clean")
    assert res.exit_code == 0, res.output
    assert resumed == _stored(tmp_path / "clean")  # the same trials, the same results as a run never cut off


@pytest.mark.parametrize("existed", [False, True])
def test_a_disk_full_while_the_store_is_created_leaves_nothing(small_recipe, tmp_path, existed):
    """SQLite's own SQLITE_FULL: no page can be added past the first."""
    run = tmp_path / "run"
    if existed:
        run.mkdir()

    def one_page(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA max_page_count = 1")

    event.listen(Engine, "connect", one_page)
    try:
        res = mua("sweep", "--recipe", small_recipe, *SMALL, "--out", run)
    finally:
        event.remove(Engine, "connect", one_page)
    one_line_error(res, f"cannot create the trial store {run / DB_NAME}", "disk full (database or disk is full)")
    assert (run.is_dir() and not any(run.iterdir())) if existed else not run.exists()


def test_a_disk_full_while_pinning_the_recipe_is_one_line(small_recipe, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_open = os.open

    def no_space(file, flags, *args, **kwargs):  # the temporary file recipe.yaml is written through
        if flags & os.O_CREAT and Path(file).name.startswith(".recipe.yaml."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_space)
    res = mua("sweep", "--recipe", small_recipe, *SMALL, "--out", run)
    one_line_error(res, f"cannot write {run / 'recipe.yaml'}", "No space left on device")
    assert not run.exists()


def test_fit_on_a_full_disk_answers_and_keeps_the_old_fit(run_copy, monkeypatch):
    assert mua("fit", run_copy).exit_code == 0
    old = (run_copy / "fit.json").read_bytes(), (run_copy / "fit.png").read_bytes()
    real_open = os.open

    def no_space(file, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(file).parent == run_copy:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_space)
    res = mua("fit", run_copy)
    assert res.exit_code == 0 and "No space left on device" in res.output, res.output
    assert ((run_copy / "fit.json").read_bytes(), (run_copy / "fit.png").read_bytes()) == old
    assert sorted(p.name for p in run_copy.iterdir()) == ["fit.json", "fit.png", "recipe.yaml", "trials.db"]


# ------------------------------------------------------------------------ a rank larger than the model's layers


def test_the_embedded_default_takes_ranks_up_to_its_width():
    from mua_cli.spec.recipe import load_recipe
    from mua_cli.train.shapes import rank_limit

    assert rank_limit(load_recipe("tiny")) == 128  # hidden size 128: q/k/v/o 128×128, MLP 128×344
    with pytest.raises(MuaError, match=r"rank 1000 is larger than the model's adapted layers allow: at most 128"):
        rank_limit(load_recipe("tiny", ranks="4,1000"))


def test_a_hugging_face_model_s_limit_comes_from_its_config_alone(tmp_path):
    """GPT-2's Conv1D layers (fan-in nx, fan-out nf); only config.json is on disk, no weights."""
    from transformers import GPT2Config

    from mua_cli.spec.recipe import Recipe
    from mua_cli.train.shapes import rank_limit

    GPT2Config(vocab_size=300, n_embd=48, n_layer=1, n_head=2, n_positions=64).save_pretrained(tmp_path / "gpt2")
    recipe = Recipe.of(name="t", model=str(tmp_path / "gpt2"), ranks="4,48", regimes="A:r")
    assert rank_limit(recipe) == 48
    with pytest.raises(MuaError, match="at most 48"):
        rank_limit(Recipe.of(name="t", model=str(tmp_path / "gpt2"), ranks="64", regimes="A:r"))


def test_a_sweep_rank_above_the_layers_fails_before_any_trial(swept, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded to run trials")

    monkeypatch.setattr("mua_cli.sweep.slots.start", no_model)
    run = tmp_path / "run"
    res = mua("sweep", "--recipe", swept.recipe, "--ranks", "2,64", "--out", run, "--device", "cpu")
    one_line_error(res, "rank 64 is larger than the model's adapted layers allow: at most 32", "lower --ranks")
    assert not run.exists()


def test_transfer_to_a_rank_above_the_layers_is_one_line(run_copy):
    """The sweep recorded the micro model's limit (width 32) with the run; fit.json carries it to transfer."""
    res = mua("transfer", run_copy, "--to", "1000")
    one_line_error(res, "rank 1000 is larger than the model's adapted layers allow: at most 32")
    assert mua("transfer", run_copy, "--to", "32", "--quiet").exit_code == 0
    assert json.loads((run_copy / "fit.json").read_text())["settings"]["max_lora_rank"] == 32


def test_a_run_that_recorded_no_limit_is_not_checked(run_copy):
    """Runs swept before the limit was recorded: their fit.json lacks it, and a rank goes through as before."""
    assert mua("fit", run_copy, "--no-plot").exit_code == 0
    doc = json.loads((run_copy / "fit.json").read_text())
    del doc["settings"]["max_lora_rank"]
    (run_copy / "fit.json").write_text(json.dumps(doc))
    later = (run_copy / DB_NAME).stat().st_mtime + 60
    os.utime(run_copy / "fit.json", (later, later))
    res = mua("transfer", run_copy, "--to", "1000", "--quiet")
    assert res.exit_code == 0 and float(res.stdout) > 0, res.output


def test_out_under_proc_is_one_line(micro_recipe_path):
    res = mua("sweep", "--recipe", micro_recipe_path, "--out", "/proc/mua-run", "--device", "cpu")
    one_line_error(res, "cannot create the run folder /proc/mua-run")


# ------------------------------------------------------------------------ issue #29: found by a hostile probe


def test_a_refused_sweep_leaves_a_run_without_recipe_yaml_resumable(swept, run_copy):
    """recipe.yaml gone: the run's settings come from its trial store, so other settings are refused without a
    byte written, and the run's own settings then resume it (it was locked out: the refusal rewrote recipe.yaml)."""
    (run_copy / "recipe.yaml").unlink()
    before = snapshot(run_copy)
    res = mua("sweep", "--recipe", swept.recipe, *SWEEP, "--steps", 30, "--out", run_copy)
    one_line_error(res, "was swept with other settings (steps 20 → 30")
    assert snapshot(run_copy) == before
    res = mua("sweep", "--recipe", swept.recipe, *SWEEP, "--out", run_copy)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run_copy / "recipe.yaml").read_text())["steps"] == 20


def test_a_run_whose_recipe_yaml_is_binary_resumes_with_its_own_settings(swept, run_copy):
    (run_copy / "recipe.yaml").write_bytes(b"\xff\xfe\x00\x81")
    res = mua("sweep", "--recipe", swept.recipe, *SWEEP, "--out", run_copy)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run_copy / "recipe.yaml").read_text())["steps"] == 20  # written again, whole


def test_an_exported_mua_storage_does_not_replace_a_named_run_folder(swept, run_copy, monkeypatch):
    monkeypatch.setenv("MUA_STORAGE", "postgresql+psycopg://mua:secret@127.0.0.1:1/mua")  # nothing listens there
    res = mua("fit", run_copy, "--json", "--no-plot")
    assert res.exit_code == 0, res.output
    res = mua("transfer", run_copy, "--to", "16", "--quiet")
    assert res.exit_code == 0 and float(res.stdout) > 0, res.output
    res = mua("sweep", "--recipe", swept.recipe, *SWEEP, "--out", run_copy)  # resumes the folder's own store
    assert res.exit_code == 0, res.output


def test_output_to_a_full_device_is_one_line(swept):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", "from mua_cli.ui.cli import main; main()", "transfer", str(swept.run), "--to",
             "16", "--quiet"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: cannot write the output (No space left on device)"]
