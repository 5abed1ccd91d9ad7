"""Notifications between replicas: PostgreSQL's LISTEN/NOTIFY.

A writer calls `Bus.notify` inside the transaction that makes a change, so the notification goes
out when (and only if) the change commits; every other replica's listener calls the handlers of
that channel. Notifications are wake-up calls, never the data: a handler reads what changed from
the store, which stays the truth. A listener that lost its connection missed notifications, so
on every (re)connect the `on_connected` callbacks run and each part re-reads what it keeps.

On SQLite there is one control-plane process (a second replica is refused at start), so the bus
is off: `notify` does nothing and no listener runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
from psycopg import sql
from sqlalchemy import Connection, text

from controlplane.store._store import Store

log = logging.getLogger(__name__)

_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
# PostgreSQL refuses payloads of 8,000 bytes or more.
MAX_PAYLOAD = 7_900

Handler = Callable[[str, str], None]
"""Called on the event loop with (sending replica id, payload)."""


class Bus:
    """LISTEN/NOTIFY between replicas on one PostgreSQL (off on SQLite)."""

    def __init__(self, store: Store, replica_id: str) -> None:
        self._store = store
        self.replica_id = replica_id
        self.enabled = store.dialect == "postgresql"
        self._handlers: dict[str, list[Handler]] = {}
        self._on_connected: list[Callable[[], None]] = []
        self.connected = asyncio.Event()
        self.received = 0
        self.reconnects = 0
        self._audience: Callable[[], bool] = lambda: True

    def set_audience(self, anyone_listening: Callable[[], bool]) -> None:
        """Tells whether another replica is alive to hear: without one, `notify` sends nothing.
        A notifying transaction takes PostgreSQL's global notification lock until it commits,
        which serialises such commits; a lone control plane should not pay for that. (A replica
        that starts meanwhile reads everything at start, and its slow polls cover the rest.)"""
        self._audience = anyone_listening

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Registers a handler (before `run` starts) for notifications from other replicas."""
        self._handlers.setdefault(channel, []).append(handler)

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Called each time the listener (re)connects: notifications may have been missed."""
        self._on_connected.append(callback)

    def notify(self, db: Connection, channel: str, payload: str, *, always: bool = False) -> None:
        """Queues a notification in `db`'s transaction; it is delivered when that commits.
        `always`: even with no other replica known (replicas announcing themselves)."""
        if self.enabled and (always or self._audience()):
            db.execute(_NOTIFY, {"channel": channel, "payload": f"{self.replica_id}|{payload}"})

    def notify_many(self, db: Connection, channel: str, payloads: list[str]) -> None:
        if self.enabled and payloads and self._audience():
            db.execute(
                _NOTIFY,
                [{"channel": channel, "payload": f"{self.replica_id}|{p}"} for p in payloads],
            )

    async def publish(self, channel: str, payload: str) -> None:
        """A notification in a transaction of its own."""
        if self.enabled:
            await self._store.run_core(lambda db: self.notify(db, channel, payload))

    def _dispatch(self, channel: str, raw: str) -> None:
        sender, _, payload = raw.partition("|")
        if sender == self.replica_id:
            return
        self.received += 1
        for handler in self._handlers.get(channel, ()):
            try:
                handler(sender, payload)
            except Exception:
                log.exception("handler of bus channel %s failed", channel)

    async def run(self) -> None:
        """Listens until cancelled, reconnecting with backoff (a supervised task)."""
        if not self.enabled:
            await asyncio.Event().wait()
        url = self._store.libpq_url()
        backoff = 0.2
        while True:
            started = time.monotonic()
            try:
                connection = await psycopg.AsyncConnection.connect(
                    url,
                    autocommit=True,
                    connect_timeout=10,
                    # A silently dropped link must not leave us listening to nothing for long.
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=3,
                )
                async with connection:
                    for channel in self._handlers:
                        await connection.execute(
                            sql.SQL("LISTEN {}").format(sql.Identifier(channel))
                        )
                    self.connected.set()
                    log.info("listening for other replicas on %d channel(s)", len(self._handlers))
                    for callback in self._on_connected:
                        callback()
                    async for notification in connection.notifies():
                        self._dispatch(notification.channel, notification.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("replica bus connection lost: %s", exc)
            finally:
                self.connected.clear()
            self.reconnects += 1
            if time.monotonic() - started > 30:
                backoff = 0.2
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
