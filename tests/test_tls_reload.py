"""The serving certificate reloads from disk without a restart and without dropping sessions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc

from certs import CertificateAuthority, write_private_key
from controlplane import TlsFiles

from .conftest import AgentFactory, ControlPlaneFactory, Pki


async def _list_agents(port: int, credentials: grpc.ChannelCredentials) -> list[str]:
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        response = await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
            fleet_pb2.ListAgentsRequest(), timeout=5
        )
    return [a.node_id for a in response.agents]


async def test_server_certificate_rotates_on_disk_without_dropping_sessions(
    pki: Pki,
    tmp_path: Path,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    original = pki.server_files()
    for source, target in (
        (original.ca, files.ca),
        (original.cert, files.cert),
        (original.key, files.key),
    ):
        shutil.copy(source, target)
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
