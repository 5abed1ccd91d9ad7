"""GPU telemetry end to end: an agent on a (faked) two-GPU node reports inventory, readings and
XID events, and the control plane shows them. Only the GPU is faked: NVML's entry points in the
real pynvml module answer with pynvml's own structs and error classes (see test_gpu_collector)."""

from __future__ import annotations

import pytest
from sentinel.v1 import telemetry_pb2

from controlplane import ControlPlane
from tests.conftest import AgentFactory, eventually
from tests.fakenvml import FakeNvml
from tests.fakenvml import h100 as _h100


async def test_gpu_inventory_readings_and_xid_reach_the_control_plane(
    monkeypatch: pytest.MonkeyPatch, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml = FakeNvml([_h100(0), _h100(1)])
    nvml.install(monkeypatch)
    node = await agent_factory("gpu-node-1", control_plane.port)

    agent = control_plane.registry.get("gpu-node-1")
    assert agent is not None
    assert [g["uuid"] for g in agent.inventory["gpus"]] == [nvml.gpus[0].uuid, nvml.gpus[1].uuid]
    assert "telemetry:gpu" in agent.capabilities

    def latest() -> telemetry_pb2.TelemetrySample | None:
        sample = control_plane.hub.latest("gpu-node-1")
        return sample.payload if sample else None

    sample = await eventually(latest)
    assert sample.gpu_status.state == telemetry_pb2.GPU_COLLECTION_STATE_OK
    assert [g.temperature_celsius for g in sample.gpus] == [41, 41]
    assert "fan_speed_percent" in sample.gpus[0].unsupported

    nvml.pending_xids.append((1, 79))  # "GPU has fallen off the bus"
    xid_metric = control_plane.metrics.agent_events.labels("GPU_XID")
    await eventually(lambda: xid_metric._value.get() == 1)
    await eventually(lambda: latest() is not None and latest().gpus[1].last_xid == 79)
    assert node.agent.connected.is_set()
