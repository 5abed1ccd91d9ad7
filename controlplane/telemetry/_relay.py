"""Telemetry across replicas: each replica relays to the others only the samples their
subscribers want.

A replica's interest is the union of its subscribers' node filters (every node for a
subscriber without one), plus short leases taken by one-off reads and health gates. It is
published on the replica's heartbeat row (`Replicas.set_interest`). A replica holding a node's
session, after storing that node's samples, sends those some other replica wants as one
notification per batch on the bus; and when another replica starts wanting a node, it first
sends that node's latest sample, then a marker saying which version of the interest it has
answered, so a one-off read can wait until every holder has answered.

Cost grows with what subscribers ask for: a sample nobody elsewhere wants is never sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Generic, TypeVar

from controlplane.store import ALL_NODES, MAX_PAYLOAD, Bus, Replica, Replicas, Store
from controlplane.telemetry._hub import Sample, TelemetryHub
from processkit import wait_event

log = logging.getLogger(__name__)

P = TypeVar("P")

CHANNEL = "sentinel_telemetry"
# How long a one-off read or a health gate keeps wanting a node's telemetry.
LEASE_S = 60.0
# How long a one-off read waits for the holders to answer a new interest.
ANSWER_WAIT_S = 1.0


class TelemetryRelay(Generic[P]):
    """Forwards wanted samples to the other replicas and takes theirs into the local hub."""

    def __init__(
        self,
        hub: TelemetryHub[P],
        store: Store,
        bus: Bus,
        replicas: Replicas,
        *,
        encode: Callable[[P], bytes],
        decode: Callable[[bytes], P],
        holds: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._store = store
        self._bus = bus
        self._replicas = replicas
        self._encode = encode
        self._decode = decode
        self._holds = holds
        self._clock = clock
        self.enabled = bus.enabled
        self._leases: dict[str, float] = {}  # node (or "*") -> monotonic expiry
        self._interest_dirty = asyncio.Event()
        self._seen_interest: dict[str, frozenset[str]] = {}
        self._answered: dict[str, int] = {}  # replica -> our interest version it answered
        self._answers = asyncio.Condition()
        self._sends: set[asyncio.Task[None]] = set()
        self.relayed_out = 0
        self.relayed_in = 0
        if self.enabled:
            bus.subscribe(CHANNEL, self._received)
            replicas.on_change(self._replicas_changed)

    # -- what this replica wants ----------------------------------------------------------------

    def subscriptions_changed(self) -> None:
        if self.enabled:
            self._interest_dirty.set()

    def want(self, node_ids: Collection[str]) -> None:
        """Wants these nodes' telemetry (every node when empty) for the next `LEASE_S`."""
        if not self.enabled:
            return
        until = self._clock() + LEASE_S
        keys = list(node_ids) or [ALL_NODES]
        new = any(k not in self._leases for k in keys)
        for key in keys:
            self._leases[key] = until
        if new:
            self._interest_dirty.set()

    def latest(self, node_id: str) -> Sample[P] | None:
        """The node's newest sample, here or (for a node held by another replica) relayed; asks
        for the node's telemetry as a side effect (health gates call this while they wait)."""
        if self.enabled and not self._holds(node_id):
            self.want((node_id,))
        return self._hub.latest(node_id)

    async def fresh(self, node_ids: Collection[str]) -> None:
        """Before a one-off read: wants the nodes and, when that is new, waits (briefly) until
        every other replica has sent what it holds of them."""
        if not self.enabled or not self._replicas.others():
            return
        if node_ids and all(self._holds(n) for n in node_ids):
            return
        self.want(node_ids)
        interest = self._interest()
        if interest == self._replicas.current_interest:
            return
        await self._publish_interest()
        version = self._replicas.interest_version
        waiting = set(self._replicas.others())
        deadline = self._clock() + ANSWER_WAIT_S
        async with self._answers:
            while True:
                waiting = {r for r in waiting if self._answered.get(r, 0) < version}
                waiting &= set(self._replicas.others())
                remaining = deadline - self._clock()
                if not waiting or remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._answers.wait(), remaining)
                except TimeoutError:
                    break
        if waiting:
            log.warning("replica(s) %s did not answer within %g s", sorted(waiting), ANSWER_WAIT_S)

    def _interest(self) -> frozenset[str]:
        now = self._clock()
        for key in [k for k, until in self._leases.items() if until <= now]:
            del self._leases[key]
        wanted: set[str] = set(self._leases)
        for nodes in self._hub.subscribed_nodes():
            if not nodes:
                return frozenset({ALL_NODES})
            wanted |= nodes
        if ALL_NODES in wanted:
            return frozenset({ALL_NODES})
        return frozenset(n for n in wanted if not self._holds(n))

    async def _publish_interest(self) -> None:
        await self._replicas.set_interest(self._interest())

    async def run(self) -> None:
        """Keeps this replica's published interest current (a supervised task)."""
        if not self.enabled:
            await asyncio.Event().wait()
        while True:
            with contextlib.suppress(TimeoutError):  # on timeout: leases may have expired
                await wait_event(self._interest_dirty, LEASE_S / 4)
            self._interest_dirty.clear()
            await self._publish_interest()
            await asyncio.sleep(0.02)  # coalesce bursts of subscribe/unsubscribe

    # -- what the others want from this replica -------------------------------------------------

    def forward(self, samples: list[Sample[P]]) -> None:
        """Called by the hub after it stored and published samples of nodes held here."""
        if not self.enabled:
            return
        others = self._replicas.others()
        if not others:
            return
        wanted = [s for s in samples if any(r.wants(s.node_id) for r in others.values())]
        if wanted:
            self._send(self._chunks(wanted), ())

    def _replicas_changed(self, others: dict[str, Replica], gone: set[str]) -> None:
        for replica_id in gone:
            self._seen_interest.pop(replica_id, None)
            self._answered.pop(replica_id, None)
        for replica_id, replica in others.items():
            before = self._seen_interest.get(replica_id, frozenset())
            if replica.interest == before and replica_id in self._seen_interest:
                continue
            self._seen_interest[replica_id] = replica.interest
            # What it newly wants: our latest of those nodes first, then the answer marker.
            if ALL_NODES in replica.interest:
                fresh = [] if ALL_NODES in before else self._hub.latest_all()
            else:
                fresh = [
                    s for n in replica.interest - before if (s := self._hub.latest(n)) is not None
                ]
            local = [s for s in fresh if self._holds(s.node_id)]
            marker = f"@{replica_id}:{replica.interest_version}"
            self._send(self._chunks(local), (marker,))

    def _chunks(self, samples: Iterable[Sample[P]]) -> list[str]:
        chunks: list[str] = []
        parts: list[str] = []
        size = 0
        for sample in samples:
            text = (
                f"{sample.node_id} {sample.seq} "
                f"{base64.b64encode(self._encode(sample.payload)).decode()}"
            )
            if len(text) > MAX_PAYLOAD - 64:
                log.warning("a sample of %s is too large to relay", sample.node_id)
                continue
            if parts and size + len(text) + 1 > MAX_PAYLOAD - 64:
                chunks.append("\n".join(parts))
                parts, size = [], 0
            parts.append(text)
            size += len(text) + 1
        if parts:
            chunks.append("\n".join(parts))
        return chunks

    def _send(self, chunks: list[str], markers: Iterable[str]) -> None:
        payloads = [*chunks, *markers]
        if not payloads:
            return
        self.relayed_out += len(chunks)
        task = asyncio.get_running_loop().create_task(self._notify(payloads))
        self._sends.add(task)
        task.add_done_callback(self._sent)

    async def _notify(self, payloads: list[str]) -> None:
        await self._store.run_core(lambda db: self._bus.notify_many(db, CHANNEL, payloads))

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("telemetry relay failed: %s", task.exception())

    # -- from the others ------------------------------------------------------------------------

    def _received(self, sender: str, payload: str) -> None:
        if payload.startswith("@"):
            replica_id, _, version = payload[1:].rpartition(":")
            if replica_id == self._replicas.replica_id:
                self._answered[sender] = max(self._answered.get(sender, 0), int(version))
                task = asyncio.get_running_loop().create_task(self._wake_readers())
                self._sends.add(task)
                task.add_done_callback(self._sent)
            return
        for line in payload.split("\n"):
            node_id, seq, body = line.split(" ", 2)
            if self._holds(node_id):
                continue  # ours now: the session here is the source
            sample = Sample(node_id, int(seq), self._decode(base64.b64decode(body)))
            if self._hub.relay(sample):
                self.relayed_in += 1

    async def _wake_readers(self) -> None:
        async with self._answers:
            self._answers.notify_all()
