"""The control plane's own health on /metrics: certificate expiry, event-loop lag, sessions held
against capacity, process resources, replicas — what the saturation and expiry alerts read."""

from __future__ import annotations

import asyncio

from cryptography import x509

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.processes.test_processes import _metrics


async def test_control_plane_exports_its_saturation_and_certificate_expiry(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory(max_agents=50)
    await agent_factory("node-1", cp.port)
    await agent_factory("node-2", cp.port)
    await asyncio.sleep(0.6)  # a couple of event-loop probes
    values = await asyncio.to_thread(_metrics, cp.metrics_port)

    server = x509.load_pem_x509_certificate(pki.server_files().cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_path.read_bytes())
    expiry = "sentinel_tls_certificate_expiry_timestamp_seconds"
    assert values[f'{expiry}{{"certificate": "server"}}'] == server.not_valid_after_utc.timestamp()
    assert values[f'{expiry}{{"certificate": "ca"}}'] == ca.not_valid_after_utc.timestamp()

    assert values["sentinel_agent_sessions_open{}"] == 2
    assert values["sentinel_agent_sessions_capacity{}"] == 50
    assert values["sentinel_replicas_live{}"] == 1
    # SQLite has no bus; on PostgreSQL the listener connects once the replica runs.
    bus = "sentinel_replica_bus_connected{}"
    if cp.bus.enabled:
        await eventually(lambda: _metrics(cp.metrics_port)[bus] == 1)
    else:
        assert values[bus] == 0
    assert values["sentinel_event_loop_lag_seconds_count{}"] >= 1
    assert values["process_resident_memory_bytes{}"] > 10_000_000
    assert values["process_open_fds{}"] > 0
    assert values["sentinel_asyncio_tasks{}"] >= 4  # two sessions' reader and writer at least
