"""The Kafka sink: delivers every stored event to a Kafka topic, at least once, in id order.

One replica runs it at a time (whoever holds the `event-sink` lease). It reads events after the
offset stored in `event_sink_offsets`, produces them to partition 0 of the topic (key: the event
id; order is a per-partition property in Kafka, and keys would scatter events over partitions),
waits until the broker acknowledged every one (acks=all), and only then stores the new offset.
A sink that stops or fails in between resends from the stored offset: duplicates are possible,
gaps are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

# aiokafka ships no type information.
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from controlplane.events._log import EventLog
from controlplane.events._model import Event, EventFilter
from controlplane.store import EVENT_SINK_OFFSETS, Store

log = logging.getLogger(__name__)


class SinkLease(Protocol):
    """Leadership of the sink among replicas (the store's lease, as the controller's)."""

    async def acquire_or_renew(self) -> object | None: ...

    async def release(self) -> None: ...


def event_json(event: Event) -> bytes:
    """The Kafka message value: the event as JSON (the ids as strings, as protobuf's JSON
    mapping writes 64-bit integers)."""
    document: dict[str, Any] = {
        "eventId": str(event.event_id),
        "time": event.at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        "kind": event.kind,
        "subject": event.subject,
        "replicaId": event.replica_id,
        "payload": event.payload,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class KafkaSink:
    """Delivers the event log to one Kafka topic while this replica holds the sink lease."""

    def __init__(
        self,
        events: EventLog,
        store: Store,
        lease: SinkLease,
        *,
        brokers: str,
        topic: str,
        name: str = "kafka",
        batch: int = 2000,
        renew_every_s: float = 3.0,
        poll_interval_s: float = 1.0,
        on_delivered: Callable[[int, float], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._events = events
        self._store = store
        self._lease = lease
        self._brokers = brokers
        self.topic = topic
        self.name = name
        self._batch = batch
        self._renew_every = renew_every_s
        self._poll_interval = poll_interval_s
        self._on_delivered = on_delivered
        self._on_failure = on_failure
        self._producer: AIOKafkaProducer | None = None
        self._wake = asyncio.Event()
        self._failing = False
        self.delivered_id = 0
        """The last event id the broker acknowledged and the store recorded (0: none yet)."""
        self.leading = False
        """Whether this replica runs the sink now."""
        events.add_listener(self._wake.set)

    async def run(self) -> None:
        """Delivers while holding the lease, until cancelled (a supervised task)."""
        try:
            backoff = 0.2
            while True:
                held = await self._lease.acquire_or_renew() is not None
                if held != self.leading:
                    state = "running" if held else "not running"
                    log.info("%s the %s event sink", state, self.name)
                self.leading = held
                if not held:
                    await self._stop_producer()
                    await asyncio.sleep(self._renew_every)
                    continue
                try:
                    await self._deliver_for(self._renew_every)
                    backoff = 0.2
                except (KafkaError, OSError) as exc:
                    await self._stop_producer()
                    if self._on_failure is not None:
                        self._on_failure()
                    if not self._failing:
                        log.warning(
                            "event sink %s cannot deliver to %s (retrying; resends from event "
                            "%d): %s",
                            self.name,
                            self._brokers,
                            self.delivered_id,
                            exc,
                        )
                    self._failing = True
                    await asyncio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311
                    backoff = min(backoff * 2, 10.0)
        finally:
            self.leading = False
            await self._stop_producer()
            try:
                await self._lease.release()
            except Exception as exc:
                log.warning("could not release the event sink lease: %s", exc)

    async def _deliver_for(self, seconds: float) -> None:
        """Delivers stored events for about `seconds` (then the lease is renewed)."""
        producer = await self._start_producer()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self._wake.clear()
            events = await self._events.list(EventFilter(), self.delivered_id, self._batch)
            if not events:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), min(self._poll_interval, until - time.monotonic())
                    )
                continue
            started = time.monotonic()
            acks = [
                await producer.send(
                    self.topic,
                    value=event_json(event),
                    key=str(event.event_id).encode(),
                    partition=0,
                    headers=[("kind", event.kind.encode())],
                )
                for event in events
            ]
            await asyncio.gather(*acks)
            last = events[-1].event_id
            await self._store_offset(last)
            self.delivered_id = last
            if self._failing:
                log.info("event sink %s delivers again (up to event %d)", self.name, last)
                self._failing = False
            if self._on_delivered is not None:
                self._on_delivered(len(events), time.monotonic() - started)

    async def _start_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        # Where the previous holder (or this replica before a failure) got to.
        self.delivered_id = await self._read_offset()
        producer = AIOKafkaProducer(
            bootstrap_servers=self._brokers.split(","),
            client_id=f"sentinel-{self._events.replica_id}"[:128],
            acks="all",
            linger_ms=5,
            max_batch_size=1024 * 1024,
            # Retries keep order: aiokafka has one request in flight per broker.
            request_timeout_ms=15_000,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        return producer

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception as exc:
                log.debug("stopping the Kafka producer: %s", exc)

    async def _read_offset(self) -> int:
        name = self.name

        def read(db: Connection) -> int:
            value = db.scalar(
                select(EVENT_SINK_OFFSETS.c.last_event_id).where(EVENT_SINK_OFFSETS.c.name == name)
            )
            if value is not None:
                return int(value)
            db.execute(
                insert(EVENT_SINK_OFFSETS).values(
                    name=name, last_event_id=0, updated_at=dt.datetime.now(dt.UTC)
                )
            )
            return 0

        try:
            return await self._store.run_core(read)
        except IntegrityError:  # another replica inserted the row first
            return await self._store.run_core(read)

    async def _store_offset(self, last_id: int) -> None:
        name = self.name
        columns = EVENT_SINK_OFFSETS.c

        def write(db: Connection) -> None:
            # Only forward: a replaced holder finishing a late batch cannot move it back.
            db.execute(
                update(EVENT_SINK_OFFSETS)
                .where(columns.name == name, columns.last_event_id < last_id)
                .values(last_event_id=last_id, updated_at=dt.datetime.now(dt.UTC))
            )

        await self._store.run_core(write)
