"""The telemetry hub: accepts samples from agent sessions, drops duplicates by (node, seq),
counts gaps, persists each node's high-water mark, then publishes to subscribers and acks.

Order matters for "none missing, none doubled" across control plane crashes: a sample is
published and acknowledged only after its seq is durably stored. A sample received but not yet
stored when the process dies is re-sent by the agent (it was never acked) and accepted once.
Payloads are opaque here: the transport decides what a sample's body is.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import Connection, bindparam, update

from controlplane.store import AGENTS, Store

log = logging.getLogger(__name__)

# A Core executemany: one statement for the whole batch, far cheaper than ORM bulk updates.
_WATERMARK_UPDATE = (
    update(AGENTS)
    .where(AGENTS.c.node_id == bindparam("key"))
    .values(
        last_telemetry_seq=bindparam("seq"),
        telemetry_gap_samples=bindparam("gaps"),
        last_seen=bindparam("seen"),
    )
)


P = TypeVar("P")
"""The type of a sample's body: the hub never looks inside it (the transport decides what it is;
the control plane's is the agent's TelemetrySample message)."""


@dataclass(frozen=True, slots=True)
class Sample(Generic[P]):
    """One telemetry sample of one node, numbered by the agent's sequence."""

    node_id: str
    seq: int
    payload: P


@dataclass
class _Node(Generic[P]):
    received: int = 0  # highest seq accepted into the pending buffer
    stored: int = 0  # highest seq durably stored (and so acknowledgeable)
    gaps: int = 0
    acked: int = 0
    last_ack: float = 0.0
    latest: Sample[P] | None = None
    pending: list[Sample[P]] = field(default_factory=list)


class SubscriberTooSlow(Exception):
    """A subscriber fell further behind than its queue allows and was cut off."""


class _Subscription(Generic[P]):
    def __init__(self, nodes: frozenset[str], max_backlog: int) -> None:
        self.nodes = nodes
        self.queue: asyncio.Queue[Sample[P] | None] = asyncio.Queue(maxsize=max_backlog)
        self.overflowed = False

    def offer(self, sample: Sample[P]) -> None:
        if self.overflowed or (self.nodes and sample.node_id not in self.nodes):
            return
        if self.queue.full():
            self.overflowed = True
            self.queue.get_nowait()
            self.queue.put_nowait(None)
        else:
            self.queue.put_nowait(sample)


@dataclass(frozen=True, slots=True)
class AcceptOutcome:
    """What accepting a telemetry batch did: samples accepted, duplicates dropped, gaps found."""

    accepted: int
    duplicates: int
    gaps: int


class TelemetryHub(Generic[P]):
    """Accepts, deduplicates, stores and publishes every node's telemetry, and acks it."""

    def __init__(
        self,
        store: Store,
        *,
        ack_interval_s: float,
        send_ack: Callable[[str, int], None],
        on_stored: Callable[[str, int, int], None] | None = None,
        on_flush: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_published: Callable[[list[Sample[P]]], None] | None = None,
        on_accepted: Callable[[list[Sample[P]]], None] | None = None,
        on_subscriptions: Callable[[], None] | None = None,
        on_relayed: Callable[[Sample[P]], None] | None = None,
    ) -> None:
        self._on_published = on_published
        # Per batch as it arrives (new samples only, before they are stored): work that needs
        # no durability is done here, spread over the messages, instead of in the flush, where
        # a fifth of a second of the fleet's samples would hold the event loop at once.
        self._on_accepted = on_accepted
        self._on_relayed = on_relayed
        self._on_subscriptions = on_subscriptions
        self._store = store
        self._ack_interval = ack_interval_s
        self._send_ack = send_ack
        self._on_stored = on_stored
        self._on_flush = on_flush
        self._clock = clock
        self._nodes: dict[str, _Node[P]] = {}
        self._dirty: set[str] = set()
        # Nodes holding stored samples not yet acked, oldest ack first: with one ack interval
        # for all, appending keeps the order, so the due ones are always at the front.
        self._owed: collections.deque[tuple[float, str]] = collections.deque()
        self._owed_set: set[str] = set()
        self._subscribers: set[_Subscription[P]] = set()
        self._flush_lock = asyncio.Lock()

    def start_session(self, node_id: str, stored_seq: int, gaps: int) -> None:
        """Sets the node's high-water mark from the registry when its session opens."""
        node = self._nodes.setdefault(node_id, _Node())
        if node.pending:
            return  # samples from the previous session are still being stored; keep counting
        node.received = node.stored = node.acked = stored_seq
        node.gaps = gaps
        node.last_ack = 0.0

    def accept(self, node_id: str, samples: list[Sample[P]]) -> AcceptOutcome:
        """Takes a batch from a session (ascending seq); cheap, never blocks."""
        node = self._nodes.setdefault(node_id, _Node())
        accepted = duplicates = gaps = 0
        for sample in samples:
            if sample.seq <= node.received:
                duplicates += 1
                continue
            if node.received and sample.seq > node.received + 1:
                missing = sample.seq - node.received - 1
                gaps += missing
                log.warning(
                    "telemetry gap: %d sample(s) after seq %d never arrived",
                    missing,
                    node.received,
                    extra={"node_id": node_id},
                )
            node.received = sample.seq
            node.pending.append(sample)
            accepted += 1
        node.gaps += gaps
        if accepted:
            self._dirty.add(node_id)
            if self._on_accepted is not None:
                self._on_accepted(samples if accepted == len(samples) else node.pending[-accepted:])
        elif duplicates and node.stored >= node.received:
            # A re-sent batch we already hold: ack again so the agent can drop it.
            self._ack(node_id, node, force=True)
        return AcceptOutcome(accepted, duplicates, gaps)

    async def flush(self) -> int:
        """Persists the high-water marks of nodes with new samples, then publishes and acks."""
        async with self._flush_lock:
            if not self._dirty:
                return 0
            batch: list[tuple[str, _Node[P], list[Sample[P]]]] = []
            for node_id in self._dirty:
                node = self._nodes[node_id]
                batch.append((node_id, node, node.pending))
                node.pending = []
            self._dirty.clear()
            # A node that sent telemetry was seen now: its last_seen rides along.
            seen = dt.datetime.now(dt.UTC)
            values = [
                {"key": node_id, "seq": samples[-1].seq, "gaps": node.gaps, "seen": seen}
                for node_id, node, samples in batch
            ]

            def write(db: Connection) -> None:
                db.execute(_WATERMARK_UPDATE, values)

            started = time.perf_counter()
            try:
                await self._store.run_core(write)
            except Exception:
                # Put the samples back so the next flush retries them; nothing is acked.
                for node_id, node, samples in batch:
                    node.pending[:0] = samples
                    self._dirty.add(node_id)
                raise
            if self._on_flush is not None:
                self._on_flush(time.perf_counter() - started)
            count = 0
            published: list[Sample[P]] = []
            for node_id, node, samples in batch:
                node.stored = max(node.stored, samples[-1].seq)
                node.latest = samples[-1]
                count += len(samples)
                for sample in samples:
                    for subscriber in self._subscribers:
                        subscriber.offer(sample)
                if self._on_published is not None:
                    published.extend(samples)
                if self._on_stored is not None:
                    self._on_stored(node_id, node.stored, node.gaps)
                # More than one sample at once means the agent is catching up: ack at once.
                self._ack(node_id, node, force=len(samples) > 1)
            if published and self._on_published is not None:
                self._on_published(published)
            return count

    def relay(self, sample: Sample[P]) -> bool:
        """Takes a sample another replica stored (its node's session is held there): it becomes
        the node's latest and goes to subscribers, unless it is not newer than what we have."""
        node = self._nodes.setdefault(sample.node_id, _Node())
        if node.latest is not None and sample.seq <= node.latest.seq:
            return False
        node.latest = sample
        for subscriber in self._subscribers:
            subscriber.offer(sample)
        if self._on_relayed is not None:
            self._on_relayed(sample)
        return True

    def subscribed_nodes(self) -> list[frozenset[str]]:
        """The node filter of every subscription (an empty set means every node)."""
        return [s.nodes for s in self._subscribers]

    def _ack(self, node_id: str, node: _Node[P], *, force: bool) -> None:
        now = self._clock()
        if node.stored <= node.acked and not force:
            return
        if force or now - node.last_ack >= self._ack_interval:
            node.acked = node.stored
            node.last_ack = now
            self._owed_set.discard(node_id)
            self._send_ack(node_id, node.stored)
        elif node_id not in self._owed_set:
            self._owed_set.add(node_id)
            self._owed.append((node.last_ack + self._ack_interval, node_id))

    def ack_due(self) -> None:
        """Acks nodes whose coalesced ack has been waiting for a full interval."""
        now = self._clock()
        while self._owed and self._owed[0][0] <= now:
            _, node_id = self._owed.popleft()
            if node_id in self._owed_set:  # else acked since it was queued
                self._ack(node_id, self._nodes[node_id], force=True)

    async def run_flusher(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
            self.ack_due()

    def latest(self, node_id: str) -> Sample[P] | None:
        node = self._nodes.get(node_id)
        return node.latest if node else None

    def latest_all(self, node_ids: Collection[str] = ()) -> list[Sample[P]]:
        wanted = set(node_ids)
        return sorted(
            (n.latest for k, n in self._nodes.items() if n.latest and (not wanted or k in wanted)),
            key=lambda s: s.node_id,
        )

    async def subscribe(
        self, node_ids: Collection[str] = (), *, include_latest: bool = False, max_backlog: int
    ) -> AsyncGenerator[Sample[P], None]:
        """Yields accepted samples of the given nodes (all when empty) until cancelled."""
        subscription: _Subscription[P] = _Subscription(frozenset(node_ids), max_backlog)
        self._subscribers.add(subscription)
        if self._on_subscriptions is not None:
            self._on_subscriptions()
        try:
            if include_latest:
                for sample in self.latest_all(node_ids):
                    yield sample
            while True:
                item = await subscription.queue.get()
                if item is None:
                    raise SubscriberTooSlow(
                        f"subscriber fell more than {max_backlog} samples behind"
                    )
                yield item
        finally:
            self._subscribers.discard(subscription)
            if self._on_subscriptions is not None:
                self._on_subscriptions()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
