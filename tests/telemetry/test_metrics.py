"""The control plane's /metrics as Prometheus scrapes it, over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from sentinel.v1 import fleet_pb2

from controlplane import ControlPlane
from tests.conftest import AgentFactory, Pki, eventually
from tests.fleet.test_fleet_service import _fleet


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_show_agents_telemetry_commands_and_grpc_calls(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    await control_plane.commands.send("node-1", "ping", {}, timeout=5)
    channel, fleet = _fleet(pki, control_plane)
    async with channel:
        await fleet.ListAgents(fleet_pb2.ListAgentsRequest())

    async def received() -> float:
        values = await scrape(control_plane.metrics_port)
        return values.get(("sentinel_telemetry_samples_received_total", ()), 0.0)

    async def flushed() -> float:
        values = await scrape(control_plane.metrics_port)
        return values.get(("sentinel_telemetry_flush_seconds_count", ()), 0.0)

    await eventually(received)
    await eventually(flushed)
    values = await scrape(control_plane.metrics_port)
    assert values[("sentinel_agents", (("status", "connected"),))] == 1
    assert values[("sentinel_agents", (("status", "suspect"),))] == 0
    assert values[("sentinel_command_round_trip_seconds_count", (("action", "ping"),))] == 1
    assert values[("sentinel_commands_total", (("action", "ping"), ("outcome", "SUCCEEDED")))] == 1
    list_agents = (("code", "OK"), ("method", "/sentinel.v1.FleetService/ListAgents"))
    assert values[("sentinel_grpc_requests_total", list_agents)] == 1
    latency = (("method", "/sentinel.v1.FleetService/ListAgents"),)
    assert values[("sentinel_grpc_request_duration_seconds_count", latency)] == 1
    assert values[("sentinel_agent_sessions_opened_total", ())] == 1
    assert values[("sentinel_telemetry_subscribers", ())] == 0
