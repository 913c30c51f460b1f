"""Storage URLs: the driver a PostgreSQL URL needs, a URL without its password for every message, and one line
for a database that cannot be reached or refuses us."""

from __future__ import annotations

import importlib.util


def redact(url: str) -> str:
    """The URL with its password replaced by ***: what messages, logs and files may show."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 — not a URL sqlalchemy reads: show only its scheme
        return url.split("://", 1)[0] + "://…" if "://" in url else url


def password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:  # noqa: BLE001
        return None


def scrub(text: str, url: str) -> str:
    """`text` (a driver's message, say) with the URL's password taken out wherever it appears."""
    secret = password(url)
    return text.replace(secret, "***") if secret else text


def with_driver(url: str) -> str:
    """`postgresql://` means psycopg2 to sqlalchemy; mua installs psycopg (3): use it when psycopg2 is absent."""
    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg2") is None:
        if importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_driver(url: str) -> str | None:
    """One line when the URL's database driver is not installed, or when it names no lasting store, else None."""
    scheme, _, rest = url.partition("://")
    if scheme.startswith("sqlite") and (rest.split("?")[0] in ("", "/", "/:memory:") or "mode=memory" in rest):
        return (
            f"storage {url}: an in-memory SQLite database keeps nothing once the command ends (every trial would be "
            "lost); name a file, sqlite:///path/trials.db, or leave --storage out for the run folder's own store"
        )
    if not scheme.startswith("postgres"):
        return None
    driver = scheme.split("+", 1)[1] if "+" in scheme else "psycopg2"
    module = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pg8000": "pg8000", "asyncpg": "asyncpg"}.get(driver)
    if module and importlib.util.find_spec(module) is None:
        return (
            f"storage {redact(url)}: the PostgreSQL driver {module!r} is not installed; "
            "`pip install 'psycopg[binary]'` (mua's own install has it) and use postgresql+psycopg://…"
        )
    return None


def connection_problem(text: str) -> str | None:
    """What a database's own error says, in a few words, for the errors a user can fix."""
    t = text.lower()
    if "password authentication failed" in t or "authentication failed" in t or "no password supplied" in t:
        return "the database refused the user name or password"
    if "connection refused" in t or "could not connect" in t or "timeout expired" in t or "no route" in t:
        return "the database cannot be reached (is the server running, and are host and port right?)"
    if "could not translate host name" in t or "name or service not known" in t:
        return "the database host name does not resolve"
    if "does not exist" in t and "database" in t:
        return "the database named in the URL does not exist on the server"
    return None
