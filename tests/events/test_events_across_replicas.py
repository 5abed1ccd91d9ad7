"""Events across replicas on one PostgreSQL: an event made on one replica is seen by a watcher
on another, and concurrent writers never make a resuming reader skip an event."""

from __future__ import annotations

import asyncio

from sentinel.v1 import events_pb2, fleet_pb2

from controlplane.events import COMMAND_FINISHED
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, needs_postgres
from tests.events._helpers import Kind, Watch, events_client, of_kind

pytestmark = needs_postgres


async def test_an_event_made_on_one_replica_is_seen_by_a_watcher_on_another(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    a = await control_plane_factory(controller_id="replica-a")
    b = await control_plane_factory(controller_id="replica-b")
    await asyncio.wait_for(b.bus.connected.wait(), 10)
    async with (
        events_client(pki, b.port) as stub,
        Watch(stub, events_pb2.WatchEventsRequest()) as watch,
    ):
        await agent_factory("node-1", a.port)
        events = await watch.until(
            lambda ev: bool(of_kind(ev, Kind.EVENT_KIND_AGENT_STATUS_CHANGED)), timeout=10
        )
    (connected,) = of_kind(events, Kind.EVENT_KIND_AGENT_STATUS_CHANGED)
    assert connected.replica_id == "replica-a"
    assert connected.agent_status_changed.status == fleet_pb2.AGENT_STATUS_CONNECTED
    # B learned of the connection from A's row; only A, which wrote it, emitted the event.
    await a.events.flush()
    await b.events.flush()
    listed = await _list_all(pki, b.port, Kind.EVENT_KIND_AGENT_STATUS_CHANGED)
    assert [(e.subject, e.replica_id) for e in listed] == [("node/node-1", "replica-a")]


async def _list_all(
    pki: Pki, port: int, kind: events_pb2.EventKind.ValueType | None = None
) -> list[events_pb2.Event]:
    out: list[events_pb2.Event] = []
    async with events_client(pki, port) as stub:
        token = ""
        while True:
            page = await stub.ListEvents(
                events_pb2.ListEventsRequest(
                    page_size=1000, page_token=token, kinds=[kind] if kind is not None else []
                )
            )
            out += page.events
            if not (token := page.next_page_token):
                return out


async def test_concurrent_writers_on_two_replicas_never_make_a_watcher_skip_an_event(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    a = await control_plane_factory(controller_id="replica-a")
    b = await control_plane_factory(controller_id="replica-b")
    await asyncio.wait_for(b.bus.connected.wait(), 10)
    total = 0
    async with (
        events_client(pki, b.port) as stub,
        Watch(stub, events_pb2.WatchEventsRequest(after_event_id=0)) as watch,
    ):
        for round_ in range(40):
            for cp in (a, b):
                for i in range(25):
                    cp.events.emit(COMMAND_FINISHED, f"node/n/command/{round_}-{i}", {})
                    total += 1
            # Both flush at once: their transactions race for ids.
            await asyncio.gather(a.events.flush(), b.events.flush())
        await watch.until(lambda ev: len(ev) >= total, timeout=20)
    stored = await _list_all(pki, a.port)
    assert [e.event_id for e in watch.events] == [e.event_id for e in stored]
    assert len(stored) == total
    assert {e.replica_id for e in stored} == {"replica-a", "replica-b"}
