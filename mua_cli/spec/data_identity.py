"""The data's part of a trial's identity: a local file or folder by its content (sha256), never by how its path is
spelt, so that an edited file makes new trials and `data.csv`, `./data.csv`, `/abs/data.csv` or a symlink to it are
one identity. Hashes are cached by resolved path, size and mtime (in mua's cache folder and in this process), so a
resumed sweep hashes a large file once. Embedded corpora and hub datasets keep their names: an embedded corpus
ships with mua, and a hub dataset's name is all mua knows of it before it loads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

SCHEME = 2  # 1: the data by its path's spelling (mua before content identity); 2: local data by content
CACHE_NAME = "data-hashes.json"
_CHUNK = 1 << 20
CACHE_ENTRIES = 4096  # the newest files hashed; an image folder's files count one each
_memo: dict[tuple, str] = {}
_writes = [True]  # whether the cache file may be written (`mua sweep --dry-run` writes nothing)
_DIRTY = "\0dirty"


def cache_root() -> Path:
    """mua's cache folder (`MUA_CACHE`, else $XDG_CACHE_HOME/mua): where train/models.py keeps models too."""
    root = os.environ.get("MUA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mua"
    return Path(root)


def local_path(spec: str) -> Path | None:
    """The file or folder `spec` names on this machine, or None (an embedded corpus, a hub dataset, nothing)."""
    spec = str(spec).strip()
    if not spec or spec.startswith("embedded:"):
        return None
    p = Path(spec).expanduser()
    return p if p.exists() else None


def data_identity(spec: str) -> str:
    """What identifies the data `spec` names: `sha256:HEX` of a local file's bytes, `sha256-tree:HEX` of a
    folder's files (relative paths and contents), else `spec` itself."""
    p = local_path(spec)
    if p is None:
        return str(spec)
    cache = _read_cache()
    n = len(cache)
    if p.is_file():
        out = "sha256:" + file_sha256(p, cache)
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s[0] == "." for s in f.relative_to(p).parts))
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f, cache)}\n".encode())
        out = "sha256-tree:" + h.hexdigest()
    if len(cache) != n or cache.get(_DIRTY):
        cache.pop(_DIRTY, None)
        _write_cache(cache)
    return out


def is_content(identity: str) -> bool:
    return identity.startswith(("sha256:", "sha256-tree:"))


def file_sha256(path: Path, cache: dict) -> str:
    """The sha256 of a file's bytes, cached by (resolved path, size, mtime): an edit changes the mtime. `cache`:
    the cache file's entries, updated here (the caller writes them back once)."""
    real = path.resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    hit = cache.get(key[0])
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        _memo[key] = hit["sha256"]
        return hit["sha256"]
    h = hashlib.sha256()
    with real.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _memo[key] = digest
    cache.pop(key[0], None)  # re-inserted last: the oldest entries are the ones dropped
    cache[key[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    cache[_DIRTY] = True
    return digest


def _read_cache() -> dict:
    try:
        doc = json.loads((cache_root() / CACHE_NAME).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def no_cache_writes():
    """Hashes computed inside are kept in this process only."""
    _writes[0] = False
    try:
        yield
    finally:
        _writes[0] = True


def _write_cache(cache: dict) -> None:
    """Whole or not at all; a cache that cannot be written costs only a second hash next time."""
    if not _writes[0]:
        return
    path = cache_root() / CACHE_NAME
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(list(cache.items())[-CACHE_ENTRIES:])))
        tmp.replace(path)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
