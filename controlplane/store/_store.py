"""The store: one SQLAlchemy engine, used from a dedicated worker thread.

SQLAlchemy's synchronous API runs on its own thread so the event loop never blocks on the
database; a single thread also serialises SQLite's writers, which SQLite wants anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIGRATIONS = pathlib.Path(__file__).parent / "migrations"


class StoreError(RuntimeError):
    """The database could not be opened or migrated."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (CLI, another process) read while the control plane writes; NORMAL keeps
    # durability across process crashes, which is what the at-least-once protocol relies on.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    """Owns the engine and the thread that talks to it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine = create_engine(url, future=True)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sentinel-store"
        )

    def migrate(self) -> None:
        """Brings the schema to the newest migration (blocking; call before serving)."""
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["engine"] = self._engine
        try:
            command.upgrade(config, "head")
        except Exception as exc:
            raise StoreError(f"cannot migrate the database at {self._safe_url()}: {exc}") from exc

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
