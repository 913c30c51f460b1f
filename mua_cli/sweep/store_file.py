"""What is done to a trial store's database before Optuna opens it: the run folder's SQLite file checked
read-only (and a write cut off by a kill rolled back, as SQLite does), and Optuna's tables made once on a fresh
PostgreSQL database."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from ..errors import MuaError

DB_NAME = "trials.db"


def make_tables_once(url: str) -> None:
    """Optuna makes its tables at a database's first open. On PostgreSQL, processes that start together on a
    fresh database (a planner and its workers) then collide in the catalog ("duplicate key value violates unique
    constraint pg_type_typname_nsp_index"): the tables are made by one of them, under an advisory lock, while the
    others wait and then find them made. Nothing to do on other databases (SQLite's file lock serializes it)."""
    if not url.startswith("postgresql"):
        return
    if tables_made(url):
        return
    import optuna  # here: the run folder's SQLite checks (and DB_NAME, read by `mua transfer`) need neither
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _TABLES_LOCK})
            conn.commit()
            try:
                optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool}).engine.dispose()
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _TABLES_LOCK})
                conn.commit()
    finally:
        engine.dispose()


def tables_made(url: str) -> bool:
    """Whether a PostgreSQL database holds all of Optuna's tables (alembic's, made last, is there); True for any
    other database. Optuna's opening stamps alembic's version where it finds none, even for a reader
    (skip_table_creation), which would collide with the process making the tables under the lock."""
    if not url.startswith("postgresql"):
        return True
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return sqlalchemy.inspect(conn).has_table("alembic_version")
    finally:
        engine.dispose()


_TABLES_LOCK = int.from_bytes(hashlib.sha256(b"mua:optuna-tables").digest()[:7], "big")


def _read_only(db: Path) -> sqlite3.Connection:
    """A connection that cannot write: SQLite refuses every write on it, whatever the file's permissions."""
    return sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)


def _check_sqlite(db: Path, run_dir: Path) -> None:
    """An SQLite file whose pages are whole, checked read-only before anything opens it for writing."""
    try:
        with open(db, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise MuaError(f"run folder {run_dir}: cannot read its trial store {DB_NAME} ({e.strerror or e})") from None
    if not head:
        return
    if head != b"SQLite format 3\x00":
        raise MuaError(_corrupted_message(run_dir, "no SQLite header"))
    _roll_back(db, run_dir)
    try:
        con = _read_only(db)
        try:
            problems = [row[0] for row in con.execute("PRAGMA quick_check(1)")]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:  # "database disk image is malformed", "file is not a database"
        raise MuaError(_corrupted_message(run_dir, _first_line(e))) from None
    if problems != ["ok"]:
        lines = [s for s in str(problems[0]).splitlines() if s.strip() and not s.startswith("***")]
        raise MuaError(_corrupted_message(run_dir, (lines or ["quick_check failed"])[0][:200]))
    if tables and "version_info" not in tables:  # another program's database: never written to
        raise MuaError(
            f"run folder {run_dir}: {DB_NAME} is an SQLite database but not a trial store (its tables: "
            f"{', '.join(sorted(tables)[:5])}); it was left untouched: use another --out folder"
        )


def _roll_back(db: Path, run_dir: Path) -> None:
    """Rolls back the unfinished write of a process killed mid-transaction, as any SQLite connection that may
    write does when it first reads (a "hot" journal): the store is then as it was before that write, nothing
    finished lost. A read-only connection cannot, and would take the store for unreadable. A journal of a write
    still in progress (another sweep's) is not hot: SQLite then only waits for it."""
    journal = db.with_name(db.name + "-journal")
    try:
        if not journal.is_file() or not journal.stat().st_size:
            return
        con = sqlite3.connect(db, timeout=60)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        if "readonly" not in str(e) and "read-only" not in str(e):
            raise MuaError(_corrupted_message(run_dir, _first_line(e))) from None
        raise MuaError(
            f"run folder {run_dir}: its trial store {DB_NAME} holds a write cut off mid-way ({journal.name}, left by a "
            "process killed while writing), which SQLite rolls back only where it may write: run the command "
            "again where the folder is writable"
        ) from None


def _corrupted_message(run_dir: Path, why: str) -> str:
    return (
        f"run folder {run_dir}: its trial store {DB_NAME} is corrupted or not an SQLite database ({why}); "
        "it was left untouched"
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
