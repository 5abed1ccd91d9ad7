"""The audit log: who did what to which resource, and how it ended. Calls are queued in memory
and written in batches; plan transitions are written by their own transaction via `audit_row`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select
from sqlalchemy.sql.elements import ColumnElement

from controlplane.store import AUDIT_EVENTS, Store, fit

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_CURSOR_PREFIX = "a1:"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited event: a mutating or refused call, or a plan transition."""

    event_id: str
    at: dt.datetime
    principal: str
    method: str
    target: str
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which events to list; empty strings and None match everything."""

    principal: str = ""
    """Exact SPIFFE id of the caller."""
    method: str = ""
    """Exact full method name (e.g. /sentinel.v1.PlanService/CancelPlan) or "plan.transition"."""
    target: str = ""
    """Exact resource name (e.g. plan/<id>)."""
    start: dt.datetime | None = None
    """Earliest time listed (inclusive)."""
    end: dt.datetime | None = None
    """Time before which events are listed (exclusive)."""


class InvalidPageToken(ValueError):
    """A page token this log did not issue; the message names the field."""


def _new_id_at(now_ns: int) -> str:
    # Zero-padded hex of the time first, so ids sort like the times they were made at.
    return f"ev-{now_ns:016x}-{secrets.token_hex(8)}"


def new_event_id() -> str:
    """A unique, time-ordered event id (36 characters)."""
    return _new_id_at(time.time_ns())


def _from_ns(now_ns: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=now_ns // 1000)


def _new_event(
    principal: str, method: str, target: str, outcome: str, detail: str, at: dt.datetime | None
) -> AuditEvent:
    now_ns = time.time_ns()
    return AuditEvent(
        event_id=_new_id_at(now_ns),
        at=at if at is not None else _from_ns(now_ns),
        principal=principal,
        method=method,
        target=target,
        outcome=outcome,
        detail=detail,
    )


def _row(event: AuditEvent) -> dict[str, Any]:
    # What callers sent (a 600-character plan id, a NUL byte) is recorded as far as the
    # columns allow, never refused: an audit write that cannot succeed would block the queue.
    return {
        "event_id": event.event_id,
        "at": event.at,
        "principal": fit(event.principal, 512),
        "method": fit(event.method, 256),
        "target": fit(event.target, 512),
        "outcome": fit(event.outcome, 32),
        "detail": fit(event.detail),
    }


def audit_row(
    principal: str,
    method: str,
    target: str,
    outcome: str,
    detail: str = "",
    at: dt.datetime | None = None,
) -> dict[str, Any]:
    """A row for `db.execute(insert(AUDIT_EVENTS), [audit_row(...)])`, so an event is written
    in the same transaction as the change it records (and rolled back with it)."""
    return _row(_new_event(principal, method, target, outcome, detail, at))


def encode_page_token(last: AuditEvent) -> str:
    micros = (last.at - _EPOCH) // dt.timedelta(microseconds=1)
    raw = f"{_CURSOR_PREFIX}{micros}:{last.event_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_page_token(token: str) -> tuple[dt.datetime, str] | None:
    """The (time, event id) after which the page starts, newest first; None for the first."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
        if not raw.startswith(_CURSOR_PREFIX):
            raise ValueError("unknown prefix")
        micros, event_id = raw.removeprefix(_CURSOR_PREFIX).split(":", 1)
        at = _EPOCH + dt.timedelta(microseconds=int(micros))
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise InvalidPageToken("page_token: not a token this server issued") from None
    if not event_id:
        raise InvalidPageToken("page_token: not a token this server issued")
    return at, event_id


def _conditions(audit_filter: AuditFilter, after: tuple[dt.datetime, str] | None) -> list[Any]:
    columns = AUDIT_EVENTS.c
    conditions: list[ColumnElement[bool]] = []
    for column, wanted in (
        (columns.principal, audit_filter.principal),
        (columns.method, audit_filter.method),
        (columns.target, audit_filter.target),
    ):
        if wanted:
            conditions.append(column == wanted)
    if audit_filter.start is not None:
        conditions.append(columns.at >= audit_filter.start)
    if audit_filter.end is not None:
        conditions.append(columns.at < audit_filter.end)
    if after is not None:
        at, event_id = after
        # Keyset paging, newest first: strictly older than the last row of the previous page.
        conditions.append(or_(columns.at < at, and_(columns.at == at, columns.event_id < event_id)))
    return conditions


class AuditLog:
    """Queues audited calls and writes them in batches; lists stored events newest first."""

    def __init__(
        self,
        store: Store,
        *,
        max_pending: int = 10_000,
        on_recorded: Callable[[AuditEvent], None] | None = None,
        on_write_failure: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._max_pending = max_pending
        # While the store refuses writes, events wait; past this many the oldest are dropped
        # (logged and counted) rather than let memory grow without bound.
        self._hard_limit = max_pending * 10
        self._on_recorded = on_recorded
        self._on_write_failure = on_write_failure
        self._pending: list[AuditEvent] = []
        self._flush_lock = asyncio.Lock()
        self._failing = False
        self.dropped = 0
        """Events discarded because the store refused writes for too long."""

    @property
    def pending(self) -> int:
        """Events recorded but not yet written."""
        return len(self._pending)

    async def record(
        self, principal: str, method: str, target: str, outcome: str, detail: str = ""
    ) -> AuditEvent:
        """Queues an event; returns at once unless the queue is full, in which case it waits
        for a flush (slowing callers down rather than dropping events)."""
        event = _new_event(principal, method, target, outcome, detail, None)
        self._pending.append(event)
        if self._on_recorded is not None:
            self._on_recorded(event)
        if len(self._pending) >= self._max_pending:
            await self.flush()
        return event

    async def flush(self) -> int:
        """Writes every queued event in one transaction; returns how many were written. On a
        store error the events stay queued for the next flush and the error is raised."""
        async with self._flush_lock:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, []
            rows = [_row(event) for event in batch]

            def write(db: Connection) -> None:
                db.execute(insert(AUDIT_EVENTS), rows)

            # The write runs on the store thread and cannot be called back: even when this
            # task is cancelled (shutdown), wait for its outcome so that the batch is neither
            # lost nor queued again after it was written.
            writing = asyncio.ensure_future(self._store.run_core(write))
            try:
                await asyncio.wait({writing})
            except asyncio.CancelledError:
                await asyncio.wait({writing})
                self._settle(batch, writing.exception())
                raise
            error = writing.exception()
            self._settle(batch, error)
            if error is not None:
                raise error
            return len(batch)

    def _settle(self, batch: list[AuditEvent], error: BaseException | None) -> None:
        """Keeps a batch whose write failed queued (in order, ahead of newer events)."""
        if error is None:
            if self._failing:
                log.warning("audit log writes to the store again (%d events written)", len(batch))
                self._failing = False
            return
        self._pending[:0] = batch
        if self._on_write_failure is not None:
            self._on_write_failure()
        if not self._failing:
            log.error(
                "cannot write %d audit event(s), kept for the next try: %s", len(batch), error
            )
        self._failing = True
        excess = len(self._pending) - self._hard_limit
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess
            log.error(
                "dropped the %d oldest audit event(s): the store refused writes while %d "
                "were waiting",
                excess,
                self._hard_limit,
            )

    async def run_flusher(self, interval_s: float) -> None:
        """Writes queued events every `interval_s` until cancelled (started by the supervisor);
        a failed write is retried on the next tick."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except Exception as exc:
                log.debug("audit flush failed: %s", exc)

    async def list(
        self, audit_filter: AuditFilter, page_size: int, page_token: str = ""
    ) -> tuple[list[AuditEvent], str]:
        """One page of stored events matching `audit_filter`, newest first, and the token of
        the next page ('' at the end). Events still queued are written first, so a listing
        includes every call that completed before it."""
        after = decode_page_token(page_token)
        try:
            await self.flush()
        except Exception as exc:
            log.warning("listing audit events without the %d queued: %s", self.pending, exc)
        conditions = _conditions(audit_filter, after)
        columns = AUDIT_EVENTS.c
        query = (
            select(AUDIT_EVENTS)
            .where(*conditions)
            .order_by(columns.at.desc(), columns.event_id.desc())
            .limit(page_size + 1)
        )

        def read(db: Connection) -> list[AuditEvent]:
            return [
                AuditEvent(
                    event_id=row.event_id,
                    at=row.at,
                    principal=row.principal,
                    method=row.method,
                    target=row.target,
                    outcome=row.outcome,
                    detail=row.detail,
                )
                for row in db.execute(query)
            ]

        events = await self._store.run_core(read)
        if len(events) <= page_size:
            return events, ""
        page = events[:page_size]
        return page, encode_page_token(page[-1])
