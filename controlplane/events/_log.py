"""The event log: domain events queued in memory, written to the `events` table in small
batches, and followed by watchers on every replica.

Event ids are the table's autoincrement ids. Readers resume "after id N", which is only safe if
ids become visible in increasing order; concurrent writers on PostgreSQL could commit a higher
id before a lower one, so every batch is written under one transaction-scoped advisory lock
(SQLite has one writer anyway). A written batch wakes this replica's follower directly and the
others through a `sentinel_event` notification sent in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, text
from sqlalchemy.sql.elements import ColumnElement

from controlplane.events._model import Event, EventFilter, EventWatchOverflow
from controlplane.store import EVENTS, Bus, Store, fit
from processkit import wait_event

log = logging.getLogger(__name__)

EVENT_CHANNEL = "sentinel_event"
"""Bus channel announcing written events (payload: the highest id written)."""

# pg_advisory_xact_lock key serialising event writes across replicas ("SENTEVNT").
_WRITE_LOCK = 0x53454E5445564E54
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class _Pending:
    at: dt.datetime
    kind: str
    subject: str
    payload: dict[str, Any]


class _Subscriber:
    __slots__ = ("event_filter", "overflowed", "queue")

    def __init__(self, event_filter: EventFilter, max_backlog: int) -> None:
        self.event_filter = event_filter
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max_backlog)
        # Set when an event did not fit: the queue is still handed out (it has no gap), then
        # the watcher is cut, so it never sees an event after one it missed.
        self.overflowed = False


def _event(row: Any) -> Event:
    return Event(row.event_id, row.at, row.kind, row.subject, row.replica_id, row.payload)


def _conditions(
    event_filter: EventFilter, after_id: int, up_to: int | None
) -> list[ColumnElement[bool]]:
    columns = EVENTS.c
    conditions: list[ColumnElement[bool]] = [columns.event_id > after_id]
    if up_to is not None:
        conditions.append(columns.event_id <= up_to)
    if event_filter.kinds:
        conditions.append(columns.kind.in_(sorted(event_filter.kinds)))
    if event_filter.subject_prefix:
        conditions.append(columns.subject.startswith(event_filter.subject_prefix, autoescape=True))
    return conditions


class EventLog:
    """Queues events, writes them in batches, and streams stored events to watchers."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        *,
        flush_interval_s: float = 0.05,
        max_batch: int = 1000,
        max_pending: int = 100_000,
        poll_interval_s: float = 5.0,
        on_written: Callable[[int], None] | None = None,
        on_write_failure: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self.replica_id = bus.replica_id
        self._flush_interval = flush_interval_s
        self._max_batch = max_batch
        # While the store refuses writes events wait; past this many the oldest are dropped
        # (logged and counted) rather than let memory grow without bound.
        self._max_pending = max_pending
        self._poll_interval = poll_interval_s
        self._on_written = on_written
        self._on_write_failure = on_write_failure
        self._pending: list[_Pending] = []
        self._flush_lock = asyncio.Lock()
        self._flush_soon = asyncio.Event()
        self._failing = False
        self.dropped = 0
        """Events discarded because the store refused writes for too long."""
        self.written = 0
        """Events this replica wrote."""
        self._subscribers: set[_Subscriber] = set()
        self._tail = 0
        """Highest event id the follower has handed to subscribers."""
        self._wake = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        bus.subscribe(EVENT_CHANNEL, lambda _sender, _payload: self.wake())
        bus.on_connected(self.wake)

    @property
    def pending(self) -> int:
        """Events emitted but not yet written."""
        return len(self._pending)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback` runs whenever events may have been written (here or on another replica);
        the Kafka sink uses it to wake."""
        self._listeners.append(callback)

    # -- writing --------------------------------------------------------------------------------

    def emit(self, kind: str, subject: str, payload: dict[str, Any]) -> None:
        """Queues an event; it is written within `flush_interval_s` (never blocks)."""
        self._pending.append(_Pending(_utcnow(), kind, subject, payload))
        if len(self._pending) >= self._max_batch:
            self._flush_soon.set()
        excess = len(self._pending) - self._max_pending
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess
            log.error("dropped the %d oldest unwritten event(s): the store refuses writes", excess)

    async def flush(self) -> int:
        """Writes every queued event (in batches of `max_batch`); returns how many. On a store
        error the unwritten events stay queued and the error is raised."""
        written = 0
        async with self._flush_lock:
            while self._pending:
                batch = self._pending[: self._max_batch]
                last_id = await self._write(batch)
                del self._pending[: len(batch)]
                written += len(batch)
                self.written += len(batch)
                if self._on_written is not None:
                    self._on_written(len(batch))
                log.debug("wrote %d event(s) up to id %d", len(batch), last_id)
                self.wake()
        return written

    async def _write(self, batch: list[_Pending]) -> int:
        rows = [
            {
                "at": p.at,
                "kind": p.kind,
                "subject": fit(p.subject, 512),
                "replica_id": fit(self.replica_id, 64),
                "payload": p.payload,
            }
            for p in batch
        ]
        bus = self._bus
        postgres = self._store.dialect == "postgresql"

        def write(db: Connection) -> int:
            if postgres:
                # Ids are drawn under the lock and it is held to the commit: ids become
                # visible in increasing order, so "after id N" never skips a late commit.
                db.execute(_LOCK, {"key": _WRITE_LOCK})
            db.execute(insert(EVENTS), rows)
            last_id = int(db.scalar(select(func.max(EVENTS.c.event_id))) or 0)
            bus.notify(db, EVENT_CHANNEL, str(last_id))
            return last_id

        # The write runs on a store thread and cannot be called back: even when this task is
        # cancelled (shutdown), wait for its outcome so the batch is neither lost nor written
        # twice.
        writing = asyncio.ensure_future(self._store.run_core(write))
        try:
            await asyncio.wait({writing})
        except asyncio.CancelledError:
            await asyncio.wait({writing})
            if writing.exception() is None:
                del self._pending[: len(batch)]
            raise
        error = writing.exception()
        if error is not None:
            if self._on_write_failure is not None:
                self._on_write_failure()
            if not self._failing:
                log.error("cannot write %d event(s), kept for the next try: %s", len(batch), error)
            self._failing = True
            raise error
        if self._failing:
            log.warning("events are written to the store again")
            self._failing = False
        return writing.result()

    async def run_writer(self) -> None:
        """Writes queued events every `flush_interval_s`, or at once when a batch is full
        (a supervised task); a failed write is retried on the next tick."""
        while True:
            if not self._flush_soon.is_set():
                with contextlib.suppress(TimeoutError):
                    await wait_event(self._flush_soon, self._flush_interval)
            self._flush_soon.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.debug("event flush failed: %s", exc)
                await asyncio.sleep(self._flush_interval)

    # -- reading --------------------------------------------------------------------------------

    async def last_id(self) -> int:
        """The highest stored event id (0 when none)."""

        def read(db: Connection) -> int:
            return int(db.scalar(select(func.max(EVENTS.c.event_id))) or 0)

        return await self._store.run_core(read)

    async def list(
        self,
        event_filter: EventFilter,
        after_id: int,
        limit: int,
        up_to: int | None = None,
    ) -> list[Event]:
        """Stored events matching `event_filter` with `after_id < id <= up_to`, oldest first."""
        query = (
            select(EVENTS)
            .where(*_conditions(event_filter, after_id, up_to))
            .order_by(EVENTS.c.event_id)
            .limit(limit)
        )

        def read(db: Connection) -> list[Event]:
            return [_event(row) for row in db.execute(query)]

        return await self._store.run_core(read)

    # -- following ------------------------------------------------------------------------------

    def wake(self) -> None:
        """New events may be stored: the follower reads them."""
        self._wake.set()
        for callback in self._listeners:
            callback()

    async def start(self) -> None:
        """Starts following from the newest stored event (call before `run_follower`)."""
        self._tail = await self.last_id()

    async def run_follower(self) -> None:
        """Reads new events as they are stored and hands them to watchers (a supervised task);
        woken by writes here and notifications from other replicas, with a slow poll as the
        safety net."""
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_event(self._wake, self._poll_interval)
            self._wake.clear()
            await self._catch_up()

    async def _catch_up(self) -> None:
        while True:
            if not self._subscribers:
                newest = await self.last_id()
                if not self._subscribers:  # nobody registered meanwhile: nothing to hand out
                    self._tail = max(self._tail, newest)
                    return
                continue
            events = await self.list(EventFilter(), self._tail, self._max_batch)
            # No await between handing events out and moving the tail: a watcher registered
            # at tail T gets, through its queue, exactly the events after T.
            for event in events:
                self._dispatch(event)
            if events:
                self._tail = events[-1].event_id
            if len(events) < self._max_batch:
                return

    def _dispatch(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.event_filter.matches(event):
                continue
            if subscriber.queue.full():
                subscriber.overflowed = True
                self._subscribers.discard(subscriber)
            else:
                subscriber.queue.put_nowait(event)

    async def watch(
        self,
        event_filter: EventFilter,
        after_id: int | None,
        max_backlog: int = 10_000,
        on_live: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[Event]:
        """Yields stored events matching `event_filter` after `after_id` (from now when None),
        then new ones as they are stored, in id order, until cancelled. Raises
        EventWatchOverflow when the watcher falls more than `max_backlog` events behind.
        `on_live` is awaited once the watcher is subscribed: every event stored from then on
        reaches it."""
        subscriber = _Subscriber(event_filter, max_backlog)
        self._subscribers.add(subscriber)
        live_from = self._tail  # the queue gets every matching event after this id
        try:
            cursor = await self.last_id() if after_id is None else after_id
            if on_live is not None:
                await on_live()
            while cursor < live_from:
                page = await self.list(event_filter, cursor, 500, up_to=live_from)
                for event in page:
                    yield event
                cursor = page[-1].event_id if len(page) == 500 else live_from
            while True:
                if subscriber.overflowed and subscriber.queue.empty():
                    raise EventWatchOverflow(
                        f"the watcher fell more than {max_backlog} events behind; resume after "
                        f"the last event id received"
                    )
                item = await subscriber.queue.get()
                if item.event_id <= cursor:
                    continue
                cursor = item.event_id
                yield item
        finally:
            self._subscribers.discard(subscriber)
