"""Revocation of certificates (by serial) and nodes: open sessions end at once, reconnects are
refused UNAUTHENTICATED saying when it was revoked, and revocations outlive restarts and reach
every control plane on the same database."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sentinel.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
)

from certs import certificate_serial_hex
from controlplane import ControlPlane
from controlplane.fleet import AgentStatus
from sentinelctl import cli as ctl
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually


def _channel(pki: Pki, cp: ControlPlane, role: str, name: str, **kwargs: Any) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials(role, name, **kwargs)
    )


def _identity(channel: grpc.aio.Channel) -> identity_pb2_grpc.IdentityServiceStub:
    return identity_pb2_grpc.IdentityServiceStub(channel)


def _serial(pki: Pki, role: str, name: str, **kwargs: Any) -> str:
    cert, _key = pki.client(role, name, **kwargs)
    return certificate_serial_hex(cert.read_bytes())


async def _revoke_serial(pki: Pki, cp: ControlPlane, serial: str) -> Any:
    async with _channel(pki, cp, "operator", "revoker") as channel:
        return await _identity(channel).RevokeCertificate(
            identity_pb2.RevokeCertificateRequest(serial=serial, reason="key leaked")
        )


@contextlib.asynccontextmanager
async def _session(
    pki: Pki, cp: ControlPlane, node_id: str, **kwargs: Any
) -> AsyncIterator[grpc.aio.StreamStreamCall]:
    """An agent session opened by hand; yields the call after its welcome."""
    async with _channel(pki, cp, "agent", node_id, **kwargs) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        await call.write(agent_pb2.ConnectRequest(hello=agent_pb2.Hello(node_id=node_id)))
        first = await call.read()
        assert first.WhichOneof("message") == "welcome"
        try:
            yield call
        finally:
            call.cancel()


async def _connect_refusal(pki: Pki, cp: ControlPlane, node_id: str, **kwargs: Any) -> str:
    """Opens a session that must be refused UNAUTHENTICATED; returns the status message."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with _session(pki, cp, node_id, **kwargs):
            pass
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
    return refused.value.details() or ""


def _not_connected(cp: ControlPlane, node_id: str) -> bool:
    state = cp.registry.get(node_id)
    return state is not None and state.status is not AgentStatus.CONNECTED


async def test_revoking_an_agents_certificate_ends_its_session_and_refuses_reconnects(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    running = await agent_factory("rev-serial", control_plane.port)
    response = await _revoke_serial(pki, control_plane, _serial(pki, "agent", "rev-serial"))

    assert response.sessions_closed == 1
    assert response.revocation.kind == "serial"
    await eventually(lambda: not running.agent.connected.is_set())
    assert _not_connected(control_plane, "rev-serial")
    message = await _connect_refusal(pki, control_plane, "rev-serial")
    assert "revoked at" in message and _serial(pki, "agent", "rev-serial") in message
    assert running.agent.sessions_opened == 1


async def test_an_open_session_of_a_revoked_certificate_ends_unauthenticated(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _session(pki, control_plane, "rev-stream") as call:
        await _revoke_serial(pki, control_plane, _serial(pki, "agent", "rev-stream"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await call.read()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "was revoked at" in (ended.value.details() or "")


async def test_revoking_a_node_refuses_its_old_certificates_but_accepts_one_issued_after(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    running = await agent_factory("rev-node", control_plane.port)
    async with _channel(pki, control_plane, "operator", "revoker") as channel:
        response = await _identity(channel).RevokeNode(
            identity_pb2.RevokeNodeRequest(node_id="rev-node", reason="decommissioned")
        )
    assert response.sessions_closed == 1
    await eventually(lambda: not running.agent.connected.is_set())
    await running.stop()
    message = await _connect_refusal(pki, control_plane, "rev-node")
    assert "node rev-node was revoked at" in message

    revoked_at = response.revocation.revoke_time.ToDatetime(tzinfo=dt.UTC)
    # Certificates carry whole seconds; this one starts strictly after the revocation.
    not_before = revoked_at.replace(microsecond=0) + dt.timedelta(seconds=1)
    # TLS refuses it before its notBefore; the handshake's clock is read in whole seconds and
    # was seen to answer "not yet valid" a few ms after it (CI), so a second of margin.
    await eventually(
        lambda: dt.datetime.now(dt.UTC) >= not_before + dt.timedelta(seconds=1), timeout=5
    )
    async with _session(pki, control_plane, "rev-node", tag="-new", not_before=not_before):
        assert control_plane.registry.get("rev-node").status is AgentStatus.CONNECTED


@pytest.mark.parametrize("role", ["planner", "operator"])
async def test_a_revoked_planner_or_operator_certificate_is_refused(
    pki: Pki, control_plane: ControlPlane, role: str
) -> None:
    async with _channel(pki, control_plane, role, f"rev-{role}") as channel:
        plans = plan_pb2_grpc.PlanServiceStub(channel)
        await plans.ListPlans(plan_pb2.ListPlansRequest())
        await _revoke_serial(pki, control_plane, _serial(pki, role, f"rev-{role}"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plans.ListPlans(plan_pb2.ListPlansRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked at" in (refused.value.details() or "")


async def test_a_revocation_survives_a_control_plane_restart(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    first = await control_plane_factory()
    serial = _serial(pki, "agent", "rev-restart")
    await _revoke_serial(pki, first, serial)
    await first.stop()

    second = await control_plane_factory()
    await _connect_refusal(pki, second, "rev-restart")
    async with _channel(pki, second, "operator", "lister") as channel:
        listed = await _identity(channel).ListRevocations(identity_pb2.ListRevocationsRequest())
    assert [(r.kind, r.value) for r in listed.revocations] == [("serial", serial)]


async def test_a_revocation_made_on_one_control_plane_is_enforced_by_another(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    first = await control_plane_factory(revocation_refresh_interval_s=0.1)
    second = await control_plane_factory(revocation_refresh_interval_s=0.1)
    running = await agent_factory("rev-shared", second.port)

    await _revoke_serial(pki, first, _serial(pki, "agent", "rev-shared"))

    await eventually(lambda: not running.agent.connected.is_set())
    await running.stop()
    await _connect_refusal(pki, second, "rev-shared")


async def test_a_viewer_may_not_revoke(pki: Pki, control_plane: ControlPlane) -> None:
    async with _channel(pki, control_plane, "viewer", "rev-viewer") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _identity(channel).RevokeNode(identity_pb2.RevokeNodeRequest(node_id="n1"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (identity_pb2.RevokeCertificateRequest(serial="not-hex!"), "serial"),
        (identity_pb2.RevokeCertificateRequest(serial=""), "serial"),
        (identity_pb2.RevokeCertificateRequest(serial="ab" * 21), "serial"),
        (identity_pb2.RevokeCertificateRequest(serial="abc", reason="x" * 2000), "reason"),
        (identity_pb2.RevokeNodeRequest(node_id="bad node"), "node_id"),
    ],
)
async def test_a_malformed_revocation_is_invalid_argument_naming_the_field(
    pki: Pki, control_plane: ControlPlane, request_message: Any, field: str
) -> None:
    async with _channel(pki, control_plane, "operator", "revoker") as channel:
        stub = _identity(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if isinstance(request_message, identity_pb2.RevokeNodeRequest):
                await stub.RevokeNode(request_message)
            else:
                await stub.RevokeCertificate(request_message)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(f"{field}: ")


async def test_list_revocations_shows_who_revoked_what_and_why(
    pki: Pki, control_plane: ControlPlane
) -> None:
    serial = _serial(pki, "agent", "rev-listed")
    async with _channel(pki, control_plane, "operator", "revoker") as channel:
        stub = _identity(channel)
        # openssl prints serials in upper case, possibly with colons: the same certificate.
        await stub.RevokeCertificate(
            identity_pb2.RevokeCertificateRequest(serial=serial.upper(), reason="lost laptop")
        )
        await stub.RevokeNode(identity_pb2.RevokeNodeRequest(node_id="gpu-17", reason="stolen"))
        first = await stub.ListRevocations(identity_pb2.ListRevocationsRequest(page_size=1))
        second = await stub.ListRevocations(
            identity_pb2.ListRevocationsRequest(page_size=1, page_token=first.next_page_token)
        )
    listed = [*first.revocations, *second.revocations]
    assert [(r.kind, r.value, r.reason) for r in listed] == [
        ("node", "gpu-17", "stolen"),
        ("serial", serial, "lost laptop"),
    ]
    assert {r.revoked_by for r in listed} == {"spiffe://sentinel.local/operator/revoker"}
    assert second.next_page_token == ""
    await _connect_refusal(pki, control_plane, "rev-listed")


async def test_sentinelctl_revokes_and_lists_revocations(
    pki: Pki, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    pki.client("operator", "revoker")
    common = [
        "--server",
        f"localhost:{control_plane.port}",
        "--certs-dir",
        str(pki.directory),
        "--identity",
        "operator-revoker",
    ]
    serial = _serial(pki, "agent", "rev-ctl")
    assert await asyncio.to_thread(ctl.main, [*common, "revoke", "--node", "gpu-9"]) == 0
    assert await asyncio.to_thread(ctl.main, [*common, "revoke", "--serial", serial]) == 0
    assert await asyncio.to_thread(ctl.main, [*common, "revoke", "--serial", "zz"]) == 1
    assert await asyncio.to_thread(ctl.main, [*common, "revocations"]) == 0
    out, err = capsys.readouterr()
    assert "revoked node gpu-9 at" in out
    assert "INVALID_ARGUMENT: serial:" in err
    listed = out.splitlines()[-2:]
    assert listed[0].split()[:2] == ["node", "gpu-9"]
    assert listed[1].split()[:2] == ["serial", serial]
    await _connect_refusal(pki, control_plane, "rev-ctl")
