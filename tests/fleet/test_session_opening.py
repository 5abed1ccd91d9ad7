"""Opening agent sessions in bursts: openings that arrive together are registered in the store
together (one transaction per burst), and each agent still gets what it would alone. Real
control plane, raw agent sessions over real mTLS on loopback, SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sentinel.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import ControlPlane
from controlplane.fleet import AgentStatus
from controlplane.store import AgentRow
from tests.conftest import ControlPlaneFactory, Pki, eventually


@contextlib.asynccontextmanager
async def session(
    pki: Pki, cp: ControlPlane, node_id: str, *, next_seq: int = 1, oldest_unacked: int = 0
) -> AsyncIterator[tuple[grpc.aio.StreamStreamCall, agent_pb2.Welcome]]:
    """An agent's session, as its first messages go: hello, then the welcome."""
    async with grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("agent", node_id)
    ) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        resume = agent_pb2.ResumeState(
            next_telemetry_seq=next_seq, oldest_unacked_seq=oldest_unacked
        )
        await call.write(
            agent_pb2.ConnectRequest(
                hello=agent_pb2.Hello(node_id=node_id, agent_version="1.2.3", resume=resume)
            )
        )
        first = await asyncio.wait_for(call.read(), 10)
        assert first.WhichOneof("message") == "welcome", first
        try:
            yield call, first.welcome
        finally:
            call.cancel()


def _telemetry(node_id: str, *seqs: int) -> agent_pb2.ConnectRequest:
    batch = agent_pb2.TelemetryBatch(
        samples=[telemetry_pb2.TelemetrySample(node_id=node_id, seq=seq) for seq in seqs]
    )
    return agent_pb2.ConnectRequest(telemetry=batch)


async def test_a_burst_of_sessions_is_registered_in_few_transactions(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory()
    nodes = [f"burst-{i:02d}" for i in range(40)]
    # Handshakes on a loaded machine spread the burst out; to see it written together, the
    # first registration is held in its transaction until every other hello is waiting.
    openings = cp.registry._openings
    write_many = openings._write_many
    first = True

    def held_first(db: Session, items: list[Any]) -> list[Any]:
        nonlocal first
        if first:
            first = False
            deadline = time.monotonic() + 10
            while len(openings._pending) < len(nodes) - len(items) and time.monotonic() < deadline:
                time.sleep(0.01)
        return write_many(db, items)

    openings._write_many = held_first
    async with contextlib.AsyncExitStack() as stack:
        welcomes = await asyncio.gather(
            *(stack.enter_async_context(session(pki, cp, node)) for node in nodes)
        )
        ids = {n: welcome.session_id for n, (_call, welcome) in zip(nodes, welcomes, strict=True)}
        assert len(set(ids.values())) == len(nodes)  # every session its own id
        for node in nodes:
            state = cp.registry.get(node)
            assert state is not None and state.status is AgentStatus.CONNECTED
            assert state.session_id == ids[node]
        rows = cp.store.run_sync(
            lambda db: {
                r.node_id: r
                for r in db.scalars(select(AgentRow).where(AgentRow.node_id.in_(nodes)))
            }
        )
        assert {n: (r.status, r.session_id, r.agent_version) for n, r in rows.items()} == {
            n: ("CONNECTED", ids[n], "1.2.3") for n in nodes
        }
        # Registered together: the first alone, the 39 that waited for it in one transaction.
        assert openings.batches == 2


async def test_an_agent_whose_state_was_reset_is_trusted_from_its_new_numbering(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory()
    async with session(pki, cp, "reset-1") as (call, welcome):
        assert welcome.acked_telemetry_seq == 0
        await call.write(_telemetry("reset-1", 1, 2, 3, 4, 5))
        await eventually(lambda: cp.registry.get("reset-1").last_telemetry_seq == 5)
    # The agent lost its state directory: it starts again at seq 1. Holding 5, the control
    # plane would drop its next five samples as duplicates; it takes the agent's numbering.
    async with session(pki, cp, "reset-1", next_seq=1) as (call, welcome):
        assert welcome.acked_telemetry_seq == 0
        await call.write(_telemetry("reset-1", 1, 2))
        await eventually(lambda: cp.registry.get("reset-1").last_telemetry_seq == 2)
        assert cp.registry.get("reset-1").telemetry_gap_samples == 0


async def test_a_known_node_keeps_its_first_sight_and_cordon_across_sessions(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory()
    async with session(pki, cp, "known-1"):
        first_seen = cp.registry.get("known-1").first_seen
    await cp.registry.set_cordoned("known-1", True)
    async with session(pki, cp, "known-1", next_seq=1) as (_call, welcome):
        state = cp.registry.get("known-1")
        assert (state.first_seen, state.cordoned) == (first_seen, True)
        assert state.session_id == welcome.session_id
