"""The package's rooms keep the pipeline one-way (docs/architecture.md): each imports only the rooms below it,
the science and the specs load without torch, and no module grows past what one reading can hold."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mua_cli"
BELOW = {  # what each room may import, besides itself
    "errors": set(),
    "atomic": set(),  # files written whole through a temporary file of its own (every room that writes a run's)
    "quiet_libraries": set(),  # process settings only; the sweep's workers import it by name (sweep/pool.py)
    "science": {"errors"},
    "spec": {"errors", "science"},
    "accel": set(),
    "train": {"errors", "science", "spec", "accel"},
    "sweep": {"errors", "atomic", "science", "spec", "accel", "train"},
    "api": {"errors", "atomic", "science", "spec", "accel", "train", "sweep"},
    "ui": {"errors", "atomic", "quiet_libraries", "science", "spec", "accel", "train", "sweep", "api"},
}
MAX_LINES = 400


def _imports(path: Path):
    """(room of `path`, room imported) for every import of mua's own modules in `path`."""
    parts = path.relative_to(PKG).with_suffix("").parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            here = list(parts[:-1])[: len(parts) - node.level]  # the package the relative import starts from
            target = here + (node.module.split(".") if node.module else [node.names[0].name])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mua_cli."):
            target = node.module.split(".")[1:]
        else:
            continue
        yield parts[0], target[0]


def _modules():
    return [p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG]


def test_every_room_imports_only_rooms_below_it():
    bad = [
        f"{p.relative_to(PKG)} imports {target}"
        for p in _modules()
        for room, target in _imports(p)
        if target != room and target not in BELOW[room]
    ]
    assert not bad, bad


def test_the_check_sees_an_import_up_the_pipeline(tmp_path):
    """The rule above can fail: a science module that imported the sweep would be caught."""
    fake = PKG / "science" / "_probe_layout.py"
    fake.write_text("from ..sweep.store import TrialStore\n")
    try:
        assert ("science", "sweep") in set(_imports(fake))
    finally:
        fake.unlink()


def _siblings(path: Path) -> set[str]:
    """The modules of `path`'s own folder that it imports, at the top or inside a function (an import inside a
    function is still a dependency: it only hides a circle until that function runs)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return out & {p.stem for p in path.parent.glob("*.py")} - {path.stem}


def _circles(folder: Path) -> list[list[str]]:
    graph = {p.stem: _siblings(p) for p in folder.glob("*.py") if p.name != "__init__.py"}
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_folder_has_an_import_circle():
    folders = {p.parent for p in _modules()}
    bad = {str(f.relative_to(PKG.parent)): c for f in folders if (c := _circles(f))}
    assert not bad, bad


def test_the_circle_check_sees_one_held_open_inside_a_function():
    a, b = PKG / "sweep" / "_probe_a.py", PKG / "sweep" / "_probe_b.py"
    a.write_text("from ._probe_b import f\n")
    b.write_text("def f():\n    from ._probe_a import f\n")
    try:
        assert ["_probe_a", "_probe_b", "_probe_a"] in _circles(PKG / "sweep")
    finally:
        a.unlink()
        b.unlink()


def test_science_and_specs_load_without_torch():
    code = (
        "import sys; import mua_cli.science.fit, mua_cli.science.full_ft, mua_cli.spec.recipe, mua_cli.spec.trial; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_module_is_longer_than_one_reading():
    long = {str(p.relative_to(PKG)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
