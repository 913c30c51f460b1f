"""A trial's data is known by its content: an edited file never reuses old trials, and two spellings of one file
(relative, absolute, a symlink) are one identity. Old run folders, which knew the data by its path, are refused
with a clear line rather than mixed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEST_RECIPE
from typer.testing import CliRunner

from mua_cli.spec import data_identity as di
from mua_cli.spec.recipe import load_recipe
from mua_cli.ui.cli import app

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again.\n" for i in range(400))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text(TEXT)
    (tmp_path / "link.txt").symlink_to(tmp_path / "data" / "train.txt")
    di._memo.clear()
    return tmp_path


def test_spellings_of_one_file_are_one_identity(data_dir):
    spellings = ["data/train.txt", "./data/train.txt", str(data_dir / "data" / "train.txt"), "link.txt",
                 "data/../data/train.txt"]  # fmt: skip
    ids = {di.data_identity(s) for s in spellings}
    assert len(ids) == 1 and next(iter(ids)).startswith("sha256:")
    fps = {load_recipe("tiny", data=s).fingerprint() for s in spellings}
    assert len(fps) == 1
    # embedded corpora and hub names are their own identity (a shipped recipe's trials keep their keys)
    assert di.data_identity("embedded:britannica") == "embedded:britannica"
    assert di.data_identity("someone/dataset@train") == "someone/dataset@train"


def test_an_edited_file_is_other_data(data_dir):
    before = load_recipe("tiny", data="data/train.txt")
    fp, ident = before.fingerprint(), before.outcome_fields()["data"]
    (data_dir / "data" / "train.txt").write_text(TEXT + "one more line\n")
    after = load_recipe("tiny", data="data/train.txt")
    assert after.fingerprint() != fp and after.outcome_fields()["data"] != ident
    # the same bytes again: the same identity as at first
    (data_dir / "data" / "train.txt").write_text(TEXT)
    assert load_recipe("tiny", data="data/train.txt").fingerprint() == fp


def test_a_folder_is_known_by_its_files(data_dir):
    folder = data_dir / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "a.png").write_bytes(b"\x89PNG one")
    first = di.data_identity(str(folder))
    assert first.startswith("sha256-tree:")
    (folder / "cat" / "b.png").write_bytes(b"\x89PNG two")
    second = di.data_identity(str(folder))
    assert second != first
    (folder / "cat" / "b.png").rename(folder / "cat" / "c.png")  # same bytes, another name: another dataset
    assert di.data_identity(str(folder)) not in (first, second)


def test_the_hash_is_cached_by_size_and_mtime(data_dir, monkeypatch):
    f = data_dir / "data" / "train.txt"
    digest = di.data_identity(str(f))
    cache = json.loads((di.cache_root() / di.CACHE_NAME).read_text())
    assert cache[str(f.resolve())]["sha256"] == digest.split(":", 1)[1]
    # a new process (no memo) reads the cache: a file whose size and mtime are unchanged is not read again
    di._memo.clear()
    st = f.stat()
    f.write_text(TEXT.replace("fox", "cat"))  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert di.data_identity(str(f)) == digest
    # a touched file is hashed again
    di._memo.clear()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert di.data_identity(str(f)) != digest


def _recipe(folder: Path, data: str) -> Path:
    p = folder / f"r-{len(list(folder.glob('r-*.yaml')))}.yaml"
    fields = {**TINY_TEST_RECIPE, "data": data, "steps": 6, "ranks": "2", "regimes": "B:1",
              "lrs": "2^-8:2^-6", "max_extend": 0, "refine": 0}  # fmt: skip
    p.write_text(yaml.safe_dump(fields))
    return p


def _sweep(*args):
    return CliRunner().invoke(app, ["sweep", "--device", "cpu", *map(str, args)])


def test_sweeps_follow_the_content_not_the_path(data_dir):
    rel = _recipe(data_dir, "data/train.txt")
    res = _sweep("--recipe", rel, "--out", "runs/edit")
    assert res.exit_code == 0, res.output
    assert "ran 3 trial(s)" in res.output
    # the same file by its absolute path and by a symlink: the same trials, all found
    for spelling in (str(data_dir / "data" / "train.txt"), "link.txt"):
        res = _sweep("--recipe", _recipe(data_dir, spelling), "--out", "runs/edit")
        assert res.exit_code == 0, res.output
        assert "ran 0 trial(s), skipped 3 already stored" in res.output
    # an edited file: never the old trials. Into the same folder: refused, saying why
    (data_dir / "data" / "train.txt").write_text(TEXT + "a changed line\n" * 50)
    res = _sweep("--recipe", rel, "--out", "runs/edit")
    assert res.exit_code == 2
    assert "swept on other data: data/train.txt is not what it was" in res.output
    assert "Traceback" not in res.output
    # by default, into a folder of its own, where every trial runs
    default_runs = set(Path("runs").iterdir())
    res = _sweep("--recipe", rel)
    assert res.exit_code == 0, res.output
    assert "ran 3 trial(s)" in res.output
    assert len(set(Path("runs").iterdir()) - default_runs) == 1


def test_an_old_run_folder_keyed_by_path_is_refused(data_dir):
    rel = _recipe(data_dir, "data/train.txt")
    res = _sweep("--recipe", rel, "--out", "runs/old")
    assert res.exit_code == 0, res.output
    # what an older mua wrote: the fingerprint of the data's spelling, and no scheme
    pinned = yaml.safe_load(Path("runs/old/recipe.yaml").read_text())
    for k in ("fingerprint_scheme", "data_identity"):
        pinned.pop(k)
    pinned["fingerprint"] = "0123456789abcdef"
    Path("runs/old/recipe.yaml").write_text(yaml.safe_dump(pinned, sort_keys=False))
    res = _sweep("--recipe", rel, "--out", "runs/old")
    assert res.exit_code == 2
    assert "swept by an older mua, which knew the data file data/train.txt by its path" in res.output


def test_a_changed_setting_is_named(data_dir):
    recipe = load_recipe(str(_recipe(data_dir, "data/train.txt")))
    old = {**recipe.pin(), **recipe.flat()}
    assert recipe.pin_mismatch(old, "runs/x") is None
    other = recipe.replace(steps=7)
    assert "other settings (steps 6 → 7)" in other.pin_mismatch(old, "runs/x")


def test_a_sweep_works_out_its_datas_identity_once_not_per_trial(data_dir, monkeypatch):
    """Each stored trial carries its data's identity, which for a folder stats and hashes its every file: worked
    out per trial, it held an image classifier's sweep 0.35 s a trial. The count does not grow with the trials."""
    import mua_cli.spec.recipe as recipe_module

    calls = []
    monkeypatch.setattr(recipe_module, "data_identity", lambda spec: calls.append(spec) or di.data_identity(spec))
    counts = []
    for i, (lrs, trials) in enumerate((("2^-8:2^-6", 3), ("2^-8:2^-3", 6))):
        p = _recipe(data_dir, "data/train.txt")
        p.write_text(yaml.safe_dump({**yaml.safe_load(p.read_text()), "lrs": lrs}))
        calls.clear()
        res = _sweep("--recipe", p, "--out", f"runs/count{i}")
        assert res.exit_code == 0, res.output
        assert f"ran {trials} trial(s)" in res.output
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0
