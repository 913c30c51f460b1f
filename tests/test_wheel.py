"""A wheel built from this checkout carries everything a user needs without it: installed into a fresh
environment (no editable install, no checkout on the path), `mua recipes` lists every recipe in recipes/, the
default recipe loads its shipped embedded model, and `mua sweep` runs it."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        pytest.fail(built.stderr[-2000:])
    (wheel,) = tmp.glob("mua_cli-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    where = "import site; print(site.getsitepackages()[0])"
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c", where], text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)  # fmt: skip
    # mua's dependencies from this environment, as a plain path: its .pth files (the editable install) stay unread
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python", tmp


def _run(python, cwd, code, env=None):
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_installed_wheel_lists_every_recipe(fresh):
    python, cwd = fresh
    res = _run(python, cwd, "import sys; from mua_cli.ui.cli import main; sys.argv = ['mua', 'recipes']; main()")
    assert res.returncode == 0, res.stderr[-2000:]
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert path.stem in res.stdout
    where = _run(python, cwd, "import mua_cli; print(mua_cli.__file__)")
    assert str(ROOT) not in where.stdout  # the wheel's copy ran, not this checkout


def test_installed_wheel_has_the_default_model(fresh):
    python, cwd = fresh
    code = ("from mua_cli.spec.recipe import load_recipe; from mua_cli.train.models import shipped_folder; "
            "r = load_recipe(); print(shipped_folder(r.model, r.data.seq_len))")  # fmt: skip
    res = _run(python, cwd, code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mua_cli/embedded" in res.stdout and str(ROOT) not in res.stdout
    res = _run(python, cwd, "from mua_cli.train.encoder import shipped_folder; print(shipped_folder())")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mua_cli/embedded/encoder-" in res.stdout and str(ROOT) not in res.stdout  # the encoder ships too


def test_installed_wheel_sweeps_the_embedded_default(fresh):
    """The default recipe, cut to three trials of five steps (and what refining adds), from the wheel alone,
    with an empty cache: the shipped model loads, nothing is pretrained or downloaded, and the trials are stored."""
    python, cwd = fresh
    env = {**os.environ, "MUA_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1"}
    argv = ["mua", "sweep", "--ranks", "4", "--regimes", "A:r", "--lrs", "2^-7:2^-5", "--steps", "5",
            "--device", "cpu", "--out", str(cwd / "run"), "--quiet"]  # fmt: skip
    res = _run(python, cwd, f"import sys; from mua_cli.ui.cli import main; sys.argv = {argv!r}; main()", env)
    assert res.returncode == 0, res.stderr[-2000:]
    count = "from mua_cli.api import load_trials; df = load_trials(sys.argv[1]); print(len(df), set(df.status))"
    res = subprocess.run([str(python), "-c", "import sys; " + count, str(cwd / "run")], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    n, statuses = res.stdout.split(" ", 1)
    assert int(n) >= 3 and "failed" not in statuses
    assert not (cwd / "cache").exists() or not any((cwd / "cache").rglob("*.safetensors"))  # nothing pretrained
