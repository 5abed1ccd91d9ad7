"""Telemetry that could not be kept is counted, never silent; a reset agent is not ignored."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from sentinel.v1 import agent_pb2_grpc

from controlplane import ControlPlane
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually


async def test_spool_overflow_while_disconnected_shows_as_a_gap(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
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
    await agent_factory("node-1", port, max_spool_samples=3)
    await eventually(lambda: second.registry.get("node-1").telemetry_gap_samples > 0)
    state = second.registry.get("node-1")
    assert state.telemetry_gap_samples >= 5
    assert second.metrics.telemetry_gaps._value.get() == state.telemetry_gap_samples


async def test_agent_with_wiped_state_is_followed_not_dropped(
    control_plane: ControlPlane, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    node = await agent_factory("node-1", control_plane.port)
    await eventually(lambda: control_plane.registry.get("node-1").last_telemetry_seq >= 5)
    await node.stop()
    shutil.rmtree(tmp_path / "agent-node-1")  # the node was re-imaged

    await agent_factory("node-1", control_plane.port)
    await eventually(lambda: control_plane.hub.latest("node-1").seq <= 3)
    await eventually(lambda: control_plane.registry.get("node-1").last_telemetry_seq >= 3)


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
