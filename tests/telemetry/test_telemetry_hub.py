"""The telemetry hub on its own (real SQLite store, no server): deduplication, gaps, coalesced
acks, and that nothing is acknowledged or published before it is stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from controlplane.fleet import AgentRegistry, HelloInfo
from controlplane.store import Store
from controlplane.telemetry import Sample, TelemetryHub


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(database_url)
    store.migrate()
    registry = AgentRegistry(store, suspect_after_s=30, disconnect_after_s=90)
    await registry.open_session(
        HelloInfo("node-1", "spiffe://sentinel.local/agent/node-1", "t", (), {}, 1, 0, 1)
    )
    yield store
    store.close()


def samples(*seqs: int) -> list[Sample[str]]:
    return [Sample("node-1", seq, f"payload-{seq}") for seq in seqs]


async def test_duplicates_dropped_gaps_counted_and_acks_coalesced(store: Store) -> None:
    clock = Clock()
    acks: list[int] = []
    hub: TelemetryHub[str] = TelemetryHub(
        store, ack_interval_s=15, send_ack=lambda n, s: acks.append(s), clock=clock
    )
    hub.start_session("node-1", 0, 0)

    assert hub.accept("node-1", samples(1)).accepted == 1
    assert acks == []  # nothing is acked before it is stored
    await hub.flush()
    assert acks == [1] and hub.latest("node-1").seq == 1

    clock.now += 5
    outcome = hub.accept("node-1", samples(1, 2, 5))
    assert (outcome.accepted, outcome.duplicates, outcome.gaps) == (2, 1, 2)
    await hub.flush()
    assert acks == [1, 5]  # a batch of several samples (catching up) is acked at once

    clock.now += 5
    hub.accept("node-1", samples(6))
    await hub.flush()
    hub.ack_due()
    assert acks == [1, 5]  # caught up: the ack waits for the interval
    clock.now += 10
    hub.ack_due()
    assert acks == [1, 5, 6]

    def stored(db):  # type: ignore[no-untyped-def]
        from controlplane.store import AgentRow

        row = db.get(AgentRow, "node-1")
        return row.last_telemetry_seq, row.telemetry_gap_samples

    assert await store.run(stored) == (6, 2)


async def test_subscribers_see_each_sample_once_in_order(store: Store) -> None:
    hub: TelemetryHub[str] = TelemetryHub(store, ack_interval_s=0, send_ack=lambda n, s: None)
    hub.start_session("node-1", 0, 0)
    stream = hub.subscribe(max_backlog=100)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the subscription registers when the generator starts
    hub.accept("node-1", samples(1, 2))
    hub.accept("node-1", samples(2, 3))
    await hub.flush()
    seen = [(await first).seq, (await stream.__anext__()).seq, (await stream.__anext__()).seq]
    assert seen == [1, 2, 3]
    await stream.aclose()
    assert hub.subscriber_count == 0
