"""End-to-end agent sessions: real control plane, real agents, real mTLS on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sentinel.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

from controlplane import ControlPlane
from controlplane.fleet import AgentStatus, CommandTimeout
from tests.conftest import AgentFactory, Pki, eventually
from tests.fakenvml import FakeNvml


def operator_channel(
    pki: Pki, cp: ControlPlane, role: str = "operator", name: str = "alice"
) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))


async def test_full_session_registers_streams_telemetry_and_runs_commands(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    no_nvidia_driver: FakeNvml,
) -> None:
    node1 = await agent_factory("node-1", control_plane.port)
    await agent_factory("node-2", control_plane.port)

    async with operator_channel(pki, control_plane) as channel:
        fleet = fleet_pb2_grpc.FleetServiceStub(channel)
        telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)

        agents = (await fleet.ListAgents(fleet_pb2.ListAgentsRequest())).agents
        assert [a.node_id for a in agents] == ["node-1", "node-2"]
        assert all(a.status == fleet_pb2.AGENT_STATUS_CONNECTED for a in agents)
        assert agents[0].spiffe_id == "spiffe://sentinel.local/agent/node-1"
        assert agents[0].host.logical_cpus > 0
        assert "action:ping" in agents[0].capabilities

        async def latest() -> telemetry_pb2.TelemetrySample | None:
            try:
                response = await telemetry.GetNodeTelemetry(
                    telemetry_pb2.GetNodeTelemetryRequest(node_id="node-1")
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return None
            return response.sample

        sample = await eventually(latest)
        assert sample.node_id == "node-1"
        assert sample.seq >= 1
        assert sample.host.memory.total_bytes > 0
        # No driver on these nodes (faked, whatever this machine has): said, not left out.
        assert sample.gpu_status.state == telemetry_pb2.GPU_COLLECTION_STATE_NO_GPU

    result = await control_plane.commands.send("node-1", "ping", {}, timeout=5)
    assert result.succeeded and result.output["pong"] is True

    result = await control_plane.commands.send(
        "node-1", "set_telemetry_interval", {"seconds": 2}, timeout=5
    )
    assert result.succeeded, result.message
    assert node1.agent._interval_s == 2.0

    bad = await control_plane.commands.send(
        "node-1", "set_telemetry_interval", {"seconds": 0}, timeout=5
    )
    assert bad.outcome == "INVALID_ARGUMENT"
    assert "parameters.seconds" in bad.message

    unknown = await control_plane.commands.send("node-1", "reformat_disk", {}, timeout=5)
    assert unknown.outcome == "UNSUPPORTED"


async def test_command_to_disconnected_node_is_delivered_when_it_returns(
    control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    node = await agent_factory("node-1", control_plane.port)
    await node.stop()
    await eventually(lambda: control_plane.registry.session_for("node-1") is None)

    pending = asyncio.create_task(control_plane.commands.send("node-1", "ping", {}, timeout=15))
    await asyncio.sleep(0.3)
    assert not pending.done()
    await agent_factory("node-1", control_plane.port)
    result = await asyncio.wait_for(pending, 15)
    assert result.succeeded


async def test_command_times_out_when_node_never_returns(
    control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    node = await agent_factory("node-1", control_plane.port)
    await node.stop()
    with pytest.raises(CommandTimeout, match="ping on node-1"):
        await control_plane.commands.send("node-1", "ping", {}, timeout=0.5)
    assert control_plane.registry.get("node-1").status is AgentStatus.SUSPECT


async def test_agents_that_vanish_right_after_hello_leave_no_session_behind(
    pki: Pki, control_plane: ControlPlane
) -> None:
    # Cancel at varying points of the session's start (store write, welcome, redelivery). The
    # timing is not controlled, so this samples the windows rather than forcing each one.
    for attempt in range(20):
        async with grpc.aio.secure_channel(
            f"localhost:{control_plane.port}", pki.channel_credentials("agent", "node-1")
        ) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
            await call.write(agent_pb2.ConnectRequest(hello=agent_pb2.Hello(node_id="node-1")))
            if attempt % 2:
                await call.read()  # the welcome
            await asyncio.sleep(0.001 * (attempt % 5))
            call.cancel()
    await eventually(lambda: control_plane.registry.session_for("node-1") is None)
    state = control_plane.registry.get("node-1")
    assert state is not None and state.status is not AgentStatus.CONNECTED
