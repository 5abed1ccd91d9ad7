"""FleetService and liveness as an operator sees them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc

from controlplane import ControlPlane
from controlplane.fleet import AgentStatus
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually


def _fleet(pki: Pki, cp: ControlPlane) -> tuple[grpc.aio.Channel, fleet_pb2_grpc.FleetServiceStub]:
    channel = grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("viewer", "readonly")
    )
    return channel, fleet_pb2_grpc.FleetServiceStub(channel)


async def test_list_agents_pages_in_node_order(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    for n in range(5):
        await agent_factory(f"node-{n}", control_plane.port)
    channel, fleet = _fleet(pki, control_plane)
    async with channel:
        seen, token = [], ""
        while True:
            page = await fleet.ListAgents(
                fleet_pb2.ListAgentsRequest(page_size=2, page_token=token)
            )
            assert len(page.agents) <= 2
            seen += [a.node_id for a in page.agents]
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"node-{n}" for n in range(5)]

        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await fleet.ListAgents(fleet_pb2.ListAgentsRequest(page_token="garbage!"))
        assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in bad_token.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as bad_size:
            await fleet.ListAgents(fleet_pb2.ListAgentsRequest(page_size=-1))
        assert bad_size.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_size" in bad_size.value.details()


async def test_get_agent_unknown_is_not_found(pki: Pki, control_plane: ControlPlane) -> None:
    channel, fleet = _fleet(pki, control_plane)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await fleet.GetAgent(fleet_pb2.GetAgentRequest(node_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await fleet.GetAgent(fleet_pb2.GetAgentRequest())
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node_id" in empty.value.details()


async def test_liveness_goes_connected_suspect_disconnected_and_watch_sees_it(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory(suspect_after_s=0.5, disconnect_after_s=1.0)
    channel, fleet = _fleet(pki, cp)
    async with channel:
        watch = fleet.WatchAgents(fleet_pb2.WatchAgentsRequest())
        statuses: list[int] = []

        async def follow() -> None:
            async for change in watch:
                if change.agent.node_id == "node-1":
                    statuses.append(change.agent.status)

        follower = asyncio.create_task(follow())
        node = await agent_factory("node-1", cp.port)
        await node.stop()
        await eventually(lambda: cp.registry.get("node-1").status is AgentStatus.DISCONNECTED)
        await eventually(lambda: fleet_pb2.AGENT_STATUS_DISCONNECTED in statuses)
        watch.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    assert statuses == [
        fleet_pb2.AGENT_STATUS_CONNECTED,
        fleet_pb2.AGENT_STATUS_SUSPECT,
        fleet_pb2.AGENT_STATUS_DISCONNECTED,
    ]


async def test_registry_survives_restart_and_nodes_get_grace_to_return(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    first = await control_plane_factory(reconnect_after_shutdown_s=30.0)
    port = first.port
    node = await agent_factory("node-1", port)
    first_seen = first.registry.get("node-1").first_seen
    await first.stop()
    await node.stop()

    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    state = second.registry.get("node-1")
    assert state is not None
    assert state.status is AgentStatus.SUSPECT  # not forgotten, not assumed alive
    assert state.first_seen == first_seen
    assert state.inventory["host"]["logicalCpus"] > 0

    await agent_factory("node-1", port)
    assert second.registry.get("node-1").status is AgentStatus.CONNECTED
    assert second.registry.get("node-1").first_seen == first_seen
