"""The store: one SQLAlchemy engine on SQLite or PostgreSQL, used from dedicated worker threads.

SQLAlchemy's synchronous API runs on its own threads so the event loop never blocks on the
database: one thread on SQLite (which serialises writers anyway), a few on PostgreSQL, where
transactions run side by side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIGRATIONS = pathlib.Path(__file__).parent / "migrations"

# The driver a bare `postgresql://` (or `postgres://`) URL gets: psycopg 3, the one we ship.
_POSTGRES_DRIVER = "postgresql+psycopg"
# Seconds to wait for a PostgreSQL server before giving up, unless the URL sets its own.
_PG_CONNECT_TIMEOUT_S = 10


class StoreError(RuntimeError):
    """The database could not be opened or migrated."""


def _parse_url(url: str) -> URL:
    """Parses a database URL; `postgresql://` and `postgres://` mean psycopg 3.

    Raises StoreError (without echoing the URL, which may hold a password) when it is not one.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError("the database URL is not a valid SQLAlchemy URL") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=_POSTGRES_DRIVER)
    return parsed


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (CLI, another process) read while the control plane writes; NORMAL keeps
    # durability across process crashes, which is what the at-least-once protocol relies on.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _postgres_session(dbapi_connection: Any, _record: Any) -> None:
    # Timestamps come back in the session's time zone; UTC makes them read the same as on
    # SQLite whatever the server's default. Committed, or the pool's reset would undo it.
    cursor = dbapi_connection.cursor()
    cursor.execute("SET TIME ZONE 'UTC'")
    cursor.close()
    dbapi_connection.commit()


def _create_engine(url: URL, threads: int = 1) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
    engine = create_engine(
        url,
        connect_args=connect_args,
        # One connection per store thread, plus the odd blocking caller (startup, CLI).
        pool_size=threads + 1,
        max_overflow=2,
        # A server restart or an idle-killing proxy must cost a reconnect, not a failed write.
        pool_pre_ping=True,
        pool_recycle=1800,
    )
    if url.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _postgres_session)
    return engine


class Store:
    """Owns the engine and the thread that talks to it."""

    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        parsed = _parse_url(url)
        # SQLite has one writer at a time: more threads would only queue on its lock. A
        # PostgreSQL server runs transactions side by side, so several threads do more work:
        # every write the control plane makes is a conditional update or an insert that is
        # safe to run concurrently with any other (see docs/decisions.md).
        sqlite = parsed.get_backend_name() == "sqlite"
        self.threads = 1 if sqlite else max(threads, 1)
        try:
            self._engine: Engine = _create_engine(parsed, self.threads)
        except Exception as exc:  # unknown dialect or driver, bad options
            raise StoreError(
                f"cannot open the database at {parsed.render_as_string(hide_password=True)}: "
                f"{_without(exc, parsed.password)}"
            ) from None
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix="sentinel-store"
        )

    @property
    def dialect(self) -> str:
        """The backend's name: "sqlite" or "postgresql"."""
        return self._engine.dialect.name

    def sqlite_path(self) -> str | None:
        """The SQLite database file, or None (another backend, or an in-memory database)."""
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return str(pathlib.Path(url.database).resolve())

    def libpq_url(self) -> str:
        """The PostgreSQL connection string for a plain psycopg connection (the replica bus's
        listener), password included; never log it."""
        url = self._engine.url.set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def migrate(self) -> None:
        """Brings the schema to the newest migration (blocking; call before serving)."""
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["engine"] = self._engine
        try:
            command.upgrade(config, "head")
        except Exception as exc:
            raise StoreError(
                f"cannot migrate the database at {self._safe_url()}: "
                f"{_without(exc, self._engine.url.password)}"
            ) from exc

    def _safe_url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def run_sync(self, work: Callable[[Session], T]) -> T:
        """Runs `work` in one transaction on the calling thread (tests, CLI, startup)."""
        with self._sessions.begin() as session:
            return work(session)

    def run_core_sync(self, work: Callable[[Connection], T]) -> T:
        """Runs `work` in one transaction on a Core connection: no ORM unit of work, for the
        batched writes of hot paths."""
        with self._engine.begin() as connection:
            return work(connection)

    async def run_core(self, work: Callable[[Connection], T]) -> T:
        """Like `run`, on a Core connection."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_core_sync, work)

    async def run(self, work: Callable[[Session], T]) -> T:
        """Runs `work` in one transaction on the store thread and returns its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, work)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._engine.dispose()


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or answer (a lost connection, a
    server restarting, a pool exhausted, SQLite busy): worth retrying, not a bug."""
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.TimeoutError):
        return True
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and bool(exc.connection_invalidated)


def _without(exc: BaseException, password: str | None) -> str:
    """The error's text with the password masked: drivers may quote the connection string."""
    text = str(exc)
    if password:
        text = text.replace(password, "***")
    return text
