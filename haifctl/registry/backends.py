"""Storage backends for the registry: one SQLite file (sqlite-utils) or one Postgres database.

The registry's SQL is written once with ``:name`` parameters and runs on both; each backend only
knows how to connect, run a statement, and hold a transaction.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from haifctl.config import mask_url
from haifctl.errors import HaifError, InvalidInput, Unavailable
from haifctl.files import private_dir

Params = Mapping[str, Any]


class Conflict(Exception):
    """A uniqueness or foreign-key constraint refused a write."""


class Backend(Protocol):
    dialect: str
    location: str

    def query(self, sql: str, params: Params | None = None) -> list[dict[str, Any]]: ...

    def execute(self, sql: str, params: Params | None = None) -> int: ...

    def transaction(self) -> Any: ...

    def close(self) -> None: ...


def _params(params: Params | None) -> dict[str, Any]:
    """The statement's parameters, after refusing a text value with a NUL byte on every backend
    alike: Postgres cannot store one (psycopg raises DataError, which no caller expects) and
    SQLite would store it but compare it oddly.  The registry refuses such names first; this
    keeps any other path from turning one into an internal error."""
    values = dict(params or {})
    for key, value in values.items():
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInput(
                "invalid_text",
                f"{key} {value[:60]!r} contains a NUL byte",
                "names and values hold no control characters",
            )
    return values


class SQLiteBackend:
    """A registry in one SQLite file, in WAL mode so that readers never wait on a writer."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        import sqlite_utils

        self.location = str(path)
        try:
            private_dir(path.parent)  # the haifctl home, usually: 0700 when we create it
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so a
            # read-then-write never deadlocks against another process upgrading its lock.
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._enable_wal(deadline=time.monotonic() + 30)
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(
                "registry_unavailable",
                f"cannot open the SQLite registry at {path}: {exc}",
                "check that the directory exists and is writable, or set HAIF_REGISTRY_URL",
            ) from None
        self._depth = 0

    def _enable_wal(self, deadline: float) -> None:
        """Switch a new file to WAL.  The switch takes an exclusive lock, and SQLite answers
        a second process or thread switching the same new file with "database is locked" at
        once rather than waiting out the connection's timeout: try again until the deadline."""
        while True:
            try:
                if self.db.journal_mode != "wal":
                    self.db.enable_wal()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # a back-off between attempts, not a wait for readiness

    def query(self, sql: str, params: Params | None = None) -> list[dict[str, Any]]:
        return list(self.db.query(sql, _params(params)))

    def execute(self, sql: str, params: Params | None = None) -> int:
        try:
            cursor = self.db.execute(sql, _params(params))
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc
        return int(cursor.rowcount)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    def close(self) -> None:
        self.db.close()


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class PostgresBackend:
    """A registry in one Postgres database (psycopg 3)."""

    dialect = "postgres"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self.location = mask_url(url)
        try:
            self.conn = psycopg.connect(
                url, autocommit=True, connect_timeout=5, row_factory=dict_row
            )
        except psycopg.ProgrammingError as exc:
            raise InvalidInput(
                "bad_registry_url",
                f"the registry URL {self.location} is not valid: {mask_url(str(exc), url)}",
                "use postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
            ) from None
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            reason = mask_url(reason, url)  # a driver's message may quote the URL's parts
            raise Unavailable(
                "registry_unreachable",
                f"cannot reach the Postgres registry at {self.location}: {reason}",
                "check that Postgres is running and the URL, user and password are right "
                "(HAIF_REGISTRY_URL or POSTGRES_*)",
            ) from None

    @staticmethod
    def _sql(sql: str) -> str:
        return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))

    def query(self, sql: str, params: Params | None = None) -> list[dict[str, Any]]:
        values = _params(params)
        with self.conn.cursor() as cur:
            cur.execute(self._sql(sql), values)
            return list(cur.fetchall()) if cur.description else []

    def execute(self, sql: str, params: Params | None = None) -> int:
        import psycopg

        values = _params(params)
        try:
            with self.conn.cursor() as cur:
                cur.execute(self._sql(sql), values)
                return int(cur.rowcount)
        except psycopg.errors.IntegrityError as exc:
            raise Conflict(str(exc)) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()


def open_backend(url: str) -> Backend:
    """Open the backend a registry URL names."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        rest = url[len("sqlite:") :]
        if not rest.startswith("//") or not rest[2:]:
            raise InvalidInput(
                "bad_registry_url",
                f"the registry URL {url!r} names no file",
                "use sqlite:///ABSOLUTE/PATH/registry.db",
            )
        raw = unquote(rest[2:])
        # sqlite:///abs/path (and SQLAlchemy's sqlite:////abs/path) name an absolute path.
        if raw.startswith("/"):
            raw = "/" + raw.lstrip("/")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            # relative to whichever directory each process started in: the CLI and the
            # daemons would each open a registry of their own
            raise InvalidInput(
                "bad_registry_url",
                f"the registry URL {url!r} names a relative path",
                f"use an absolute one: sqlite:///{path.absolute().as_posix().lstrip('/')}",
            )
        if not path.parent.is_dir():
            raise InvalidInput(
                "bad_registry_url",
                f"the registry URL names a file in {path.parent}, which does not exist",
                f"create it first (mkdir -p {path.parent}), or fix the path",
            )
        if path.is_dir():
            raise InvalidInput(
                "bad_registry_url",
                f"the registry URL points at a directory: {path}",
                f"name a file, e.g. sqlite:///{path / 'registry.db'}",
            )
        return SQLiteBackend(path)
    if scheme in ("postgresql", "postgres"):
        return PostgresBackend(url)
    raise InvalidInput(
        "bad_registry_url",
        f"unsupported registry URL {mask_url(url)!r}",
        "use sqlite:///PATH/registry.db or postgresql://USER:PASS@HOST:PORT/DB",
    )


__all__ = ["Backend", "Conflict", "HaifError", "PostgresBackend", "SQLiteBackend", "open_backend"]
