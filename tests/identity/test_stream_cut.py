"""Open streams (WatchAgents, StreamTelemetry, WatchPlan) of a revoked certificate or a deleted
user end at once with UNAUTHENTICATED saying why, as agent sessions do; revocations and
deletions made on another control plane cut them within the refresh interval. Streams of other
callers stay open."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from sentinel.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

from certs import certificate_serial_hex
from controlplane import ControlPlane
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.plan_helpers import APPROVAL_POLICY, plan, step

SECRET = b"0123456789abcdef0123456789abcdef-stream-secret"
PASSWORD = "correct horse battery"

Opener = Callable[[grpc.aio.Channel, Any], Any]


def _channel(pki: Pki, cp: ControlPlane, role: str, name: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))


def _watch_agents(channel: grpc.aio.Channel, metadata: Any) -> Any:
    return fleet_pb2_grpc.FleetServiceStub(channel).WatchAgents(
        fleet_pb2.WatchAgentsRequest(), metadata=metadata
    )


def _stream_telemetry(channel: grpc.aio.Channel, metadata: Any) -> Any:
    return telemetry_pb2_grpc.TelemetryServiceStub(channel).StreamTelemetry(
        telemetry_pb2.StreamTelemetryRequest(), metadata=metadata
    )


@pytest.fixture
async def control_plane(
    control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> ControlPlane:
    return await control_plane_factory(**_settings(tmp_path))


def _settings(tmp_path: pathlib.Path) -> dict[str, Any]:
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    policy = tmp_path / "approvals.yaml"
    policy.write_text(APPROVAL_POLICY)
    return {
        "jwt_secret_file": str(secret),
        "policy_paths": str(policy),
        "revocation_refresh_interval_s": 0.1,
    }


async def _plan_awaiting_approval(pki: Pki, cp: ControlPlane, agents: AgentFactory) -> str:
    await agents("cut-node", cp.port)
    async with _channel(pki, cp, "planner", "cut-planner") as channel:
        submitted = await plan_pb2_grpc.PlanServiceStub(channel).SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["cut-node"]), confidence=0.1))
        )
    assert submitted.plan.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
    return str(submitted.plan.plan_id)


async def _open(
    pki: Pki, cp: ControlPlane, agents: AgentFactory, kind: str, channel: grpc.aio.Channel
) -> Any:
    """Opens a stream of `kind` and waits until the control plane holds it open."""
    before = len(cp.streams)
    if kind == "WatchPlan":
        plan_id = await _plan_awaiting_approval(pki, cp, agents)
        call = plan_pb2_grpc.PlanServiceStub(channel).WatchPlan(
            plan_pb2.WatchPlanRequest(plan_id=plan_id)
        )
    elif kind == "WatchAgents":
        call = _watch_agents(channel, None)
    else:
        call = _stream_telemetry(channel, None)
    await eventually(lambda: len(cp.streams) > before)
    return call


async def _ending(call: Any) -> grpc.aio.AioRpcError:
    """Reads the stream to its end, which must be an error."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await call.read()
    return ended.value


@pytest.mark.parametrize("kind", ["WatchAgents", "StreamTelemetry", "WatchPlan"])
async def test_revoking_a_certificate_ends_its_open_stream_unauthenticated(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory, kind: str
) -> None:
    cp = control_plane
    async with (
        _channel(pki, cp, "viewer", f"cut-{kind.lower()}") as doomed,
        _channel(pki, cp, "viewer", "bystander") as other,
    ):
        call = await _open(pki, cp, agent_factory, kind, doomed)
        bystander = _watch_agents(other, None)
        await eventually(lambda: len(cp.streams) == 2)
        cert, _key = pki.client("viewer", f"cut-{kind.lower()}")
        async with _channel(pki, cp, "operator", "revoker") as admin:
            await identity_pb2_grpc.IdentityServiceStub(admin).RevokeCertificate(
                identity_pb2.RevokeCertificateRequest(
                    serial=certificate_serial_hex(cert.read_bytes()), reason="laptop stolen"
                )
            )
        ended = await _ending(call)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "was revoked at" in (ended.details() or "")
        assert "laptop stolen" in (ended.details() or "")
        assert len(cp.streams) == 1 and not bystander.done()
        bystander.cancel()


async def _create_user(pki: Pki, cp: ControlPlane, username: str) -> None:
    async with _channel(pki, cp, "operator", "admin") as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
            identity_pb2.CreateUserRequest(username=username, role="viewer", password=PASSWORD)
        )


async def _delete_user(pki: Pki, cp: ControlPlane, username: str) -> None:
    async with _channel(pki, cp, "operator", "admin") as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).DeleteUser(
            identity_pb2.DeleteUserRequest(username=username)
        )


async def _access_token(pki: Pki, cp: ControlPlane, username: str) -> str:
    async with _channel(pki, cp, "viewer", "laptop") as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(username=username, password=PASSWORD)
        )
    return str(reply.access_token)


async def test_deleting_a_user_ends_the_streams_opened_with_its_token(
    pki: Pki, control_plane: ControlPlane
) -> None:
    cp = control_plane
    await _create_user(pki, cp, "dora")
    await _create_user(pki, cp, "edgar")
    dora = (("authorization", f"Bearer {await _access_token(pki, cp, 'dora')}"),)
    edgar = (("authorization", f"Bearer {await _access_token(pki, cp, 'edgar')}"),)
    # Both over the same certificate: only the deleted user's stream goes.
    async with _channel(pki, cp, "viewer", "shared-host") as channel:
        doomed = _stream_telemetry(channel, dora)
        kept = _watch_agents(channel, edgar)
        await eventually(lambda: len(cp.streams) == 2)
        await _delete_user(pki, cp, "dora")
        ended = await _ending(doomed)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "user 'dora' no longer exists" in (ended.details() or "")
        assert len(cp.streams) == 1 and not kept.done()
        kept.cancel()


async def test_a_revocation_or_deletion_on_another_control_plane_cuts_streams_here(
    pki: Pki, control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> None:
    first = await control_plane_factory(**_settings(tmp_path))
    second = await control_plane_factory(**_settings(tmp_path))
    await _create_user(pki, first, "fred")
    token = (("authorization", f"Bearer {await _access_token(pki, first, 'fred')}"),)
    async with (
        _channel(pki, second, "viewer", "remote-cut") as by_certificate,
        _channel(pki, second, "viewer", "fred-laptop") as by_token,
    ):
        certificate_stream = _watch_agents(by_certificate, None)
        token_stream = _stream_telemetry(by_token, token)
        await eventually(lambda: len(second.streams) == 2)

        cert, _key = pki.client("viewer", "remote-cut")
        async with _channel(pki, first, "operator", "revoker") as admin:
            await identity_pb2_grpc.IdentityServiceStub(admin).RevokeCertificate(
                identity_pb2.RevokeCertificateRequest(
                    serial=certificate_serial_hex(cert.read_bytes()), reason="rotated"
                )
            )
        ended = await _ending(certificate_stream)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "was revoked at" in (ended.details() or "")

        await _delete_user(pki, first, "fred")
        ended = await _ending(token_stream)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "user 'fred' no longer exists" in (ended.details() or "")
    assert len(second.streams) == 0
