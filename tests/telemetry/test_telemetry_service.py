"""TelemetryService: latest samples, fleet snapshot, filtered streams, and bad filters."""

from __future__ import annotations

import grpc
import pytest
from sentinel.v1 import telemetry_pb2, telemetry_pb2_grpc

from controlplane import ControlPlane
from tests.conftest import AgentFactory, Pki, eventually


def _stub(
    pki: Pki, cp: ControlPlane
) -> tuple[grpc.aio.Channel, telemetry_pb2_grpc.TelemetryServiceStub]:
    channel = grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("planner", "inframind")
    )
    return channel, telemetry_pb2_grpc.TelemetryServiceStub(channel)


async def test_stream_filters_by_node_and_metric(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    await agent_factory("node-2", control_plane.port)
    channel, stub = _stub(pki, control_plane)
    async with channel:
        call = stub.StreamTelemetry(
            telemetry_pb2.StreamTelemetryRequest(
                node_ids=["node-2"], metrics=["host.memory.total_bytes", "host.load"]
            )
        )
        received = []
        async for response in call:
            received.append(response.sample)
            if len(received) == 3:
                break
        call.cancel()
    for sample in received:
        assert sample.node_id == "node-2"
        assert sample.seq > 0 and sample.HasField("collect_time")
        assert sample.host.memory.total_bytes > 0
        assert sample.host.memory.available_bytes == 0  # not requested
        assert sample.host.HasField("load")
        assert not sample.host.HasField("cpu")
        assert not sample.HasField("gpu_status")
    assert [s.seq for s in received] == sorted(s.seq for s in received)


async def test_unknown_metric_path_is_invalid_argument_with_field_path(
    pki: Pki, control_plane: ControlPlane
) -> None:
    channel, stub = _stub(pki, control_plane)
    async with channel:
        call = stub.StreamTelemetry(
            telemetry_pb2.StreamTelemetryRequest(metrics=["host.load", "host.cpu.bogus"])
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metrics[1]" in refused.value.details()
    assert "host.cpu.bogus" in refused.value.details()


async def test_fleet_snapshot_and_node_lookup(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    await agent_factory("node-2", control_plane.port)
    await eventually(lambda: len(control_plane.hub.latest_all()) == 2)
    channel, stub = _stub(pki, control_plane)
    async with channel:
        snapshot = await stub.GetFleetTelemetry(telemetry_pb2.GetFleetTelemetryRequest())
        assert [s.node_id for s in snapshot.samples] == ["node-1", "node-2"]
        one = await stub.GetFleetTelemetry(
            telemetry_pb2.GetFleetTelemetryRequest(node_ids=["node-2"], page_size=1)
        )
        assert [s.node_id for s in one.samples] == ["node-2"]
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetNodeTelemetry(telemetry_pb2.GetNodeTelemetryRequest(node_id="ghost"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
