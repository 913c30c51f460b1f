"""Files written into a run folder whole or not at all, through a temporary file that this process alone made.

The temporary file is created with O_CREAT|O_EXCL (`tempfile.mkstemp`) beside its target, so a name planted in
the folder beforehand (a symlink `fit.json.tmp -> ../victim.txt`, say) is never opened, followed or
overwritten; `os.replace` then swaps the finished file in (a symlink at the target itself is replaced, not
followed). Every write into a run folder goes through here: fit.json, recipe.yaml, fit.png.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_UMASK = os.umask(0o022)  # read once, at import (reading it sets it: not something to do while threads write files)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A new temporary file beside `path`, open for writing (`mode` "w" or "wb"); renamed to `path` when the
    block ends without an error, removed when it raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
        os.chmod(tmp, 0o644 & ~_UMASK)  # mkstemp makes 0600; a run folder's files are read by others as before
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to `path` whole or not at all."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
