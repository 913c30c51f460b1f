"""A real PostgreSQL server for tests, started by scripts/postgres.sh (not a test file).

`start_server(dir)` installs PostgreSQL when it is missing (Debian's package, through apt; needs root), starts a
server with its data in `dir` on a free port of 127.0.0.1 and returns a `Server`. The `pg_server` fixture (session
scope) does the same in a fresh directory under the system's temporary directory (not pytest's tmp_path: as root,
the server runs as the `postgres` user, which cannot enter /tmp/pytest-of-root) and stops it at the end. When
PostgreSQL or the driver (psycopg) cannot be had, tests that use the fixture are skipped, or fail where
MUA_REQUIRE_POSTGRES is set (CI). Use it from a test module or a conftest with
`from pg_server import pg_server  # noqa: F401`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "postgres.sh"
USER, PASSWORD, DATABASE = "mua", "secret-pw", "mua"
REQUIRE_ENV = "MUA_REQUIRE_POSTGRES"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL, or its Python driver, cannot be installed or started here."""


def _script(*args: str, timeout: float = 120) -> str:
    try:
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostgresUnavailable(f"{SCRIPT.name} {' '.join(args)}: {e}") from None
    if done.returncode != 0:
        raise PostgresUnavailable(f"{SCRIPT.name} {' '.join(args)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_for(port: int, database: str = DATABASE, password: str = PASSWORD) -> str:
    return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}/{database}"


@dataclass
class Server:
    dir: Path
    port: int
    url: str

    def start(self) -> None:
        self.url = _script("start", str(self.dir), str(self.port)).splitlines()[-1]

    def stop(self) -> None:
        _script("stop", str(self.dir))

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the data; open connections are cut."""
        self.stop()
        self.start()

    def make_database(self, name: str) -> str:
        """A new empty database `name` owned by `mua` (dropped first if it exists); its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(url_for(self.port).replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return url_for(self.port, name)


def start_server(tmp_dir: str | os.PathLike) -> Server:
    """Install PostgreSQL if needed and start a server with its data in `tmp_dir` (empty, or a data directory
    of an earlier start) on a free port. As root, every parent of `tmp_dir` must be searchable by the `postgres`
    user (e.g. a directory from tempfile.mkdtemp()). Raises PostgresUnavailable with the reason."""
    if importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailable("the driver is not installed: pip install 'psycopg[binary]'")
    _script("install", timeout=900)
    server = Server(dir=Path(tmp_dir).resolve(), port=free_port(), url="")
    server.start()
    return server


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def pg_server():
    tmp = tempfile.mkdtemp(prefix="mua-pg-")
    try:
        server = start_server(tmp)
    except PostgresUnavailable as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _required():
            pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV} is set) but unavailable: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable (set {REQUIRE_ENV}=1 to fail instead): {e}")
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
