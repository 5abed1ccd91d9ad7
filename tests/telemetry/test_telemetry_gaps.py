"""Telemetry that could not be kept is counted, never silent; a reset agent is not ignored."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sentinel.v1 import agent_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

from controlplane import ControlPlane
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually


@contextlib.asynccontextmanager
async def _seqs_published(pki: Pki, cp: ControlPlane, node_id: str) -> AsyncIterator[list[int]]:
    """The seqs of `node_id`'s samples a StreamTelemetry subscriber receives, in order; the
    subscription is open on the server before the body runs."""
    seen: list[int] = []
    async with grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("viewer", "gaps")
    ) as channel:
        call = telemetry_pb2_grpc.TelemetryServiceStub(channel).StreamTelemetry(
            telemetry_pb2.StreamTelemetryRequest(node_ids=[node_id])
        )

        async def consume() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                async for response in call:
                    seen.append(response.sample.seq)

        task = asyncio.create_task(consume())
        try:
            await eventually(lambda: cp.hub.subscriber_count == 1)
            yield seen
        finally:
            call.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_spool_overflow_while_disconnected_shows_as_a_gap(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    first = await control_plane_factory(reconnect_after_shutdown_s=60.0)
    port = first.port
    node = await agent_factory("node-1", port, max_spool_samples=3)
    await eventually(lambda: first.registry.get("node-1").last_telemetry_seq >= 2)
    await first.stop()
    held = node.agent.acked_seq
    # Far more samples than the spool holds are taken while no control plane listens.
    await eventually(lambda: node.agent.last_sample.seq >= held + 10)
    await node.stop()

    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    before = second.registry.get("node-1")
    stored_seq = before.last_telemetry_seq
    assert before.telemetry_gap_samples == 0  # the first session lost nothing
    async with _seqs_published(pki, second, "node-1") as published:
        await agent_factory("node-1", port, max_spool_samples=3)
        await eventually(lambda: len(published) >= 3)
    # The spool kept the newest 3 samples: the first seq that arrives is the first one after
    # those that were dropped, and every seq between it and the stored one is a gap.
    first_resent = published[0]
    assert published[:3] == [first_resent, first_resent + 1, first_resent + 2]
    dropped = first_resent - stored_seq - 1
    assert dropped >= 5  # far more were taken than the spool holds
    state = second.registry.get("node-1")
    assert state.telemetry_gap_samples == dropped
    assert second.metrics.telemetry_gaps._value.get() == dropped


async def test_agent_with_wiped_state_is_followed_not_dropped(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    node = await agent_factory("node-1", control_plane.port)
    await eventually(lambda: control_plane.registry.get("node-1").last_telemetry_seq >= 5)
    await node.stop()
    shutil.rmtree(tmp_path / "agent-node-1")  # the node was re-imaged

    held = control_plane.registry.get("node-1").last_telemetry_seq
    async with _seqs_published(pki, control_plane, "node-1") as published:
        await agent_factory("node-1", control_plane.port)
        await eventually(lambda: len(published) >= 3)
    # Numbered from 1 again, below what the control plane held: each new sample is taken (not
    # dropped as a duplicate of an old seq), and the restart is not counted as a gap.
    assert held >= 5 and published[:3] == [1, 2, 3]
    state = control_plane.registry.get("node-1")
    assert state.telemetry_gap_samples == 0
    assert control_plane.metrics.telemetry_duplicates._value.get() == 0


async def test_silent_session_is_ended_after_the_hello_timeout(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory(hello_timeout_s=0.3)
    async with grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("agent", "node-1")
    ) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "hello" in ended.value.details()
    assert cp.registry.get("node-1") is None
