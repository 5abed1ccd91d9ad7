"""Who may connect and call what: refusals at the TLS handshake and by the role interceptor."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from sentinel.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
)

from certs import CertificateAuthority
from controlplane import ControlPlane
from tests.conftest import AgentFactory, Pki, eventually


def _target(cp: ControlPlane) -> str:
    return f"localhost:{cp.port}"


async def _list_agents(channel: grpc.aio.Channel) -> fleet_pb2.ListAgentsResponse:
    return await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
        fleet_pb2.ListAgentsRequest(), timeout=5
    )


async def session_refusal(
    pki: Pki,
    cp: ControlPlane,
    identity: tuple[str, str],
    *messages: agent_pb2.ConnectRequest,
    expect_welcome: bool = False,
) -> grpc.aio.AioRpcError:
    """Opens a raw agent session as `identity`, sends `messages`, returns how it was refused."""
    async with grpc.aio.secure_channel(_target(cp), pki.channel_credentials(*identity)) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        # The refusal may arrive while a write is still in flight: any step may raise it.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.write(messages[0])
            if expect_welcome:
                assert (await call.read()).WhichOneof("message") == "welcome"
            for message in messages[1:]:
                await call.write(message)
            while True:
                await call.read()
    return refused.value


def hello(node_id: str) -> agent_pb2.ConnectRequest:
    return agent_pb2.ConnectRequest(hello=agent_pb2.Hello(node_id=node_id))


async def test_operator_with_valid_certificate_is_served(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with grpc.aio.secure_channel(
        _target(control_plane), pki.channel_credentials("operator", "alice")
    ) as channel:
        response = await _list_agents(channel)
    assert list(response.agents) == []


async def test_client_without_certificate_is_refused_at_handshake(
    pki: Pki, control_plane: ControlPlane
) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca_path.read_bytes())
    async with grpc.aio.secure_channel(_target(control_plane), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list_agents(channel)
    # The server requires a client certificate: the handshake fails before any RPC exists.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert control_plane.metrics.grpc_requests._metrics == {}


async def test_client_certificate_from_another_ca_is_refused(
    pki: Pki, control_plane: ControlPlane
) -> None:
    stranger = CertificateAuthority.create("Somebody else's CA")
    credentials = pki.channel_credentials("operator", "mallory", ca=stranger, tag="-foreign")
    async with grpc.aio.secure_channel(_target(control_plane), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list_agents(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert control_plane.metrics.grpc_requests._metrics == {}


async def test_expired_client_certificate_is_refused(pki: Pki, control_plane: ControlPlane) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    credentials = pki.channel_credentials(
        "operator", "bob", valid_for=dt.timedelta(days=1), not_before=long_ago, tag="-expired"
    )
    async with grpc.aio.secure_channel(_target(control_plane), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list_agents(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_viewer_may_read_but_not_submit_plans(pki: Pki, control_plane: ControlPlane) -> None:
    async with grpc.aio.secure_channel(
        _target(control_plane), pki.channel_credentials("viewer", "carol")
    ) as channel:
        await _list_agents(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plan_pb2_grpc.PlanServiceStub(channel).SubmitPlan(plan_pb2.SubmitPlanRequest())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "viewer" in refused.value.details()
    assert "SubmitPlan" in refused.value.details()


async def test_operator_may_not_open_an_agent_session(
    pki: Pki, control_plane: ControlPlane
) -> None:
    refused = await session_refusal(pki, control_plane, ("operator", "alice"), hello("node-1"))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert control_plane.registry.get("node-1") is None


async def test_agent_whose_certificate_names_another_node_is_refused(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    # The agent holds node-a's certificate but claims to be node-b in its hello.
    imposter = await agent_factory(
        "node-b", control_plane.port, cert_name="node-a", wait_connected=False
    )
    await eventually(
        lambda: control_plane.metrics.sessions_refused.labels("foreign_node")._value.get() >= 1
    )
    assert not imposter.agent.connected.is_set()
    assert control_plane.registry.get("node-b") is None
    assert control_plane.registry.get("node-a") is None


async def test_raw_session_with_foreign_node_id_ends_permission_denied(
    pki: Pki, control_plane: ControlPlane
) -> None:
    refused = await session_refusal(pki, control_plane, ("agent", "node-a"), hello("node-b"))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "node-b" in refused.details()
    assert control_plane.registry.get("node-b") is None


async def test_session_that_does_not_start_with_hello_is_refused(
    pki: Pki, control_plane: ControlPlane
) -> None:
    heartbeat = agent_pb2.ConnectRequest(heartbeat=agent_pb2.Heartbeat())
    refused = await session_refusal(pki, control_plane, ("agent", "node-a"), heartbeat)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in refused.details()


async def test_agent_may_not_send_telemetry_for_another_node(
    pki: Pki, control_plane: ControlPlane
) -> None:
    forged = agent_pb2.TelemetryBatch()
    forged.samples.add(seq=1, node_id="node-b")
    refused = await session_refusal(
        pki,
        control_plane,
        ("agent", "node-a"),
        hello("node-a"),
        agent_pb2.ConnectRequest(telemetry=forged),
        expect_welcome=True,
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "telemetry.samples[].node_id" in refused.details()
    assert control_plane.hub.latest("node-b") is None
