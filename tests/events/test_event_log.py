"""The event log without a server: batching, ordering, resuming and cutting slow watchers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from controlplane.events import (
    COMMAND_FINISHED,
    PLAN_TRANSITIONED,
    Event,
    EventFilter,
    EventLog,
    EventWatchOverflow,
)
from controlplane.store import Bus, Store


@pytest.fixture
async def event_log(database_url: str) -> AsyncIterator[EventLog]:
    store = Store(database_url, threads=2)
    await asyncio.to_thread(store.migrate)
    log = EventLog(store, Bus(store, "r1"), max_batch=100)
    await log.start()
    follower = asyncio.create_task(log.run_follower())
    yield log
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    store.close()


async def test_events_are_written_in_batches_with_increasing_ids(event_log: EventLog) -> None:
    for i in range(250):
        event_log.emit(PLAN_TRANSITIONED, f"plan/p{i % 3}", {"i": i})
    assert await event_log.flush() == 250
    stored = await event_log.list(EventFilter(), 0, 1000)
    assert [e.payload["i"] for e in stored] == list(range(250))
    assert [e.event_id for e in stored] == list(range(1, 251))
    only_p1 = await event_log.list(EventFilter(subject_prefix="plan/p1"), 0, 1000)
    assert [e.payload["i"] for e in only_p1] == list(range(1, 250, 3))


async def test_a_watcher_that_falls_behind_is_cut_and_resumes_from_its_last_id(
    event_log: EventLog,
) -> None:
    received: list[Event] = []
    watch = event_log.watch(EventFilter(kinds=frozenset({COMMAND_FINISHED})), None, max_backlog=5)
    reader = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.1)  # registered; now 20 matching events arrive while it reads none
    for i in range(20):
        event_log.emit(COMMAND_FINISHED, f"node/n/command/c{i}", {"i": i})
        event_log.emit(PLAN_TRANSITIONED, "plan/x", {"i": i})  # filtered out: costs no room
    await event_log.flush()
    received.append(await asyncio.wait_for(reader, 5))
    with pytest.raises(EventWatchOverflow):
        while True:
            received.append(await asyncio.wait_for(watch.__anext__(), 5))
    await watch.aclose()
    assert 1 <= len(received) <= 6
    assert [e.payload["i"] for e in received] == list(range(len(received)))

    # Resuming after the last id received gives exactly the rest, in order.
    resumed = event_log.watch(
        EventFilter(kinds=frozenset({COMMAND_FINISHED})), received[-1].event_id
    )
    rest = [await asyncio.wait_for(resumed.__anext__(), 5) for _ in range(20 - len(received))]
    await resumed.aclose()
    assert [e.payload["i"] for e in received + rest] == list(range(20))
