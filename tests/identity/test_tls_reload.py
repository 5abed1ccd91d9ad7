"""The serving certificate reloads from disk without a restart and without dropping sessions."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import pytest
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc

from certs import CertificateAuthority, Identity, write_private_key
from controlplane import TlsFiles
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki


async def _list_agents(port: int, credentials: grpc.ChannelCredentials) -> list[str]:
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        response = await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
            fleet_pb2.ListAgentsRequest(), timeout=5
        )
    return [a.node_id for a in response.agents]


def _copy_server_files(pki: Pki, directory: Path) -> TlsFiles:
    """The test PKI's serving files, copied where the test may rotate them."""
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    original = pki.server_files()
    for source, target in (
        (original.ca, files.ca),
        (original.cert, files.cert),
        (original.key, files.key),
    ):
        shutil.copy(source, target)
    return files


async def test_server_certificate_rotates_on_disk_without_dropping_sessions(
    pki: Pki,
    tmp_path: Path,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    files = _copy_server_files(pki, tmp_path)
    cp = await control_plane_factory(tls=files)
    node = await agent_factory("node-1", cp.port)
    sessions_before = cp.metrics.sessions_opened._value.get()

    # Rotate to a serving certificate from a new CA (client certificates still from the old).
    new_ca = CertificateAuthority.create("Sentinel rotated serving CA")
    served = new_ca.issue_server()
    write_private_key(files.key, served.private_key_pem)
    # Half-way through the rotation (new key, old certificate) the old pair keeps serving.
    assert await _list_agents(cp.port, pki.channel_credentials("operator", "alice")) == ["node-1"]
    files.cert.write_bytes(served.certificate_pem)
    stat = files.cert.stat()
    os.utime(files.cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    cert, key = pki.client("operator", "alice")
    trusts_new = grpc.ssl_channel_credentials(
        new_ca.certificate_pem, key.read_bytes(), cert.read_bytes()
    )
    assert await _list_agents(cp.port, trusts_new) == ["node-1"]
    with pytest.raises(grpc.aio.AioRpcError) as old_trust:
        await _list_agents(cp.port, pki.channel_credentials("operator", "alice"))
    assert old_trust.value.code() == grpc.StatusCode.UNAVAILABLE

    # The agent's session, opened under the old certificate, is still the same one.
    result = await cp.commands.send("node-1", "ping", {}, timeout=5)
    assert result.succeeded
    assert cp.metrics.sessions_opened._value.get() == sessions_before
    assert node.agent.sessions_opened == 1


async def test_rotation_under_a_hundred_agents_loses_no_session(
    pki: Pki,
    tmp_path: Path,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    files = _copy_server_files(pki, tmp_path)
    # Slow telemetry keeps a hundred in-process agents light; liveness is what matters here.
    cp = await control_plane_factory(tls=files, telemetry_interval_s=30.0)
    agents = await asyncio.gather(
        *(agent_factory(f"fleet-{i:03d}", cp.port, telemetry_interval_s=30.0) for i in range(100))
    )
    sessions = {a.agent.settings.node_id: cp.registry.get(a.agent.settings.node_id).session_id
                for a in agents}  # fmt: skip
    assert len(set(sessions.values())) == 100

    # Rotate both: a new serving certificate, and a CA bundle that adds a second client CA
    # (old agents keep their certificates; new clients may come from the new CA).
    next_ca = CertificateAuthority.create("Sentinel next client CA")
    served = pki.ca.issue_server()
    bundle = files.ca.read_bytes() + next_ca.certificate_pem
    for path, data in ((files.ca, bundle), (files.cert, served.certificate_pem)):
        path.write_bytes(data)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    write_private_key(files.key, served.private_key_pem)

    # A client of the new CA is accepted now: the new bundle is in force.
    newcomer = next_ca.issue_client(Identity("sentinel.local", "operator", "newcomer"))
    trusts = grpc.ssl_channel_credentials(
        pki.ca_path.read_bytes(), newcomer.private_key_pem, newcomer.certificate_pem
    )
    listed = await _list_agents(cp.port, trusts)
    assert len(listed) == 100

    # Every agent still has the session it opened before the rotation, and answers on it.
    results = await asyncio.gather(
        *(cp.commands.send(node, "ping", {}, timeout=10) for node in sessions)
    )
    assert all(r.succeeded for r in results)
    after = {node: cp.registry.get(node).session_id for node in sessions}
    assert after == sessions
    assert all(a.agent.sessions_opened == 1 for a in agents)
