"""Bad peers do not stall other agents or grow the control plane without bound: connections
that never finish TLS are closed, one connection cannot open unbounded streams, and oversized
messages are refused with RESOURCE_EXHAUSTED while the server serves on."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import pytest
from sentinel.v1 import plan_pb2, telemetry_pb2, telemetry_pb2_grpc

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.plan_helpers import plan_client


async def test_half_open_connections_are_closed_and_do_not_stall_agents(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory(handshake_timeout_s=1.0)
    # 200 clients that connect and never say a word of TLS.
    idle = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", cp.port))
        sock.setblocking(False)
        idle.append(sock)
    try:
        node = await agent_factory("node-1", cp.port)  # a real agent gets in meanwhile
        await eventually(lambda: node.agent.acked_seq >= 3)

        def closed_by_server() -> bool:
            for sock in idle:
                try:
                    if sock.recv(1) != b"":
                        return False
                except BlockingIOError:
                    return False  # still open
                except ConnectionError:
                    pass
            return True

        await eventually(closed_by_server, timeout=10)
        assert node.agent.connected.is_set()
    finally:
        for sock in idle:
            sock.close()


async def test_one_connection_may_not_open_unbounded_streams(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory(max_streams_per_connection=5)
    async with grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("planner", "inframind")
    ) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        calls = [stub.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest()) for _ in range(8)]
        readers = [asyncio.create_task(_drain(c)) for c in calls]
        try:
            await eventually(lambda: cp.hub.subscriber_count == 5)
            await asyncio.sleep(0.5)
            assert cp.hub.subscriber_count == 5  # the other three wait for a free stream
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


def _started(calls: list[grpc.aio.UnaryStreamCall]) -> int:
    return sum(1 for c in calls if c.done() or c._cython_call is not None)


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async for _ in call:
            pass


async def test_an_oversized_message_is_refused_and_the_server_serves_on(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory()
    async with plan_client(pki, cp.port) as planner:
        huge = plan_pb2.SubmitPlanRequest()
        huge.plan.rationale = "x" * (17 * 1024 * 1024)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await planner.SubmitPlan(huge, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        listed = await planner.ListPlans(plan_pb2.ListPlansRequest(), timeout=10)
        assert list(listed.plans) == []
