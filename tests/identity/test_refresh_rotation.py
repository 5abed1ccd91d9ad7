"""Refresh tokens rotate with reuse detection (OAuth 2.0 Security BCP): each Refresh returns a
new refresh token and invalidates the old; presenting one that was already used revokes that
login's whole family, its access tokens and open streams included, on every control plane on
the database. Other logins of the same user are untouched."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import grpc
import pytest
from sentinel.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import ControlPlane
from controlplane.store import LoginRow
from tests.conftest import ControlPlaneFactory, Pki, eventually

SECRET = b"0123456789abcdef0123456789abcdef-rotation-secret"
PASSWORD = "correct horse battery"


def _settings(tmp_path: pathlib.Path) -> dict[str, Any]:
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    return {"jwt_secret_file": str(secret), "revocation_refresh_interval_s": 0.1}


@pytest.fixture
async def control_plane(
    pki: Pki, control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> ControlPlane:
    cp = await control_plane_factory(**_settings(tmp_path))
    async with _channel(pki, cp, "operator", "admin") as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
            identity_pb2.CreateUserRequest(username="alice", role="operator", password=PASSWORD)
        )
    return cp


def _channel(pki: Pki, cp: ControlPlane, role: str = "viewer", name: str = "laptop") -> Any:
    return grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))


async def _login(pki: Pki, cp: ControlPlane) -> Any:
    async with _channel(pki, cp) as channel:
        return await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(username="alice", password=PASSWORD)
        )


async def _refresh(pki: Pki, cp: ControlPlane, refresh_token: str) -> Any:
    async with _channel(pki, cp) as channel:
        return await auth_pb2_grpc.AuthServiceStub(channel).Refresh(
            auth_pb2.RefreshRequest(refresh_token=refresh_token)
        )


async def _refused_refresh(pki: Pki, cp: ControlPlane, refresh_token: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _refresh(pki, cp, refresh_token)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return refused.value.details() or ""


async def _audit_call(pki: Pki, cp: ControlPlane, access_token: str) -> tuple[Any, str]:
    metadata = (("authorization", f"Bearer {access_token}"),)
    async with _channel(pki, cp) as channel:
        try:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(), metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _logins(cp: ControlPlane) -> list[LoginRow]:
    def read(db: Session) -> list[LoginRow]:
        rows = list(db.scalars(select(LoginRow).order_by(LoginRow.created_at)))
        db.expunge_all()
        return rows

    return cp.store.run_sync(read)


async def test_each_refresh_rotates_and_the_old_refresh_token_no_longer_refreshes_quietly(
    pki: Pki, control_plane: ControlPlane
) -> None:
    cp = control_plane
    first = await _login(pki, cp)
    second = await _refresh(pki, cp, first.refresh_token)
    third = await _refresh(pki, cp, second.refresh_token)
    assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
    assert (await _audit_call(pki, cp, third.access_token))[0] == grpc.StatusCode.OK
    # One login, one row, naming only the newest refresh token.
    assert len(_logins(cp)) == 1 and _logins(cp)[0].revoked_at is None


async def test_reusing_a_refresh_token_revokes_the_whole_login(
    pki: Pki, control_plane: ControlPlane
) -> None:
    cp = control_plane
    stolen = await _login(pki, cp)
    other_login = await _login(pki, cp)  # alice on another laptop
    rotated = await _refresh(pki, cp, stolen.refresh_token)

    message = await _refused_refresh(pki, cp, stolen.refresh_token)
    assert "used twice" in message and "log in again" in message

    # Every token of that login is dead: the newest refresh token and the access tokens.
    assert "revoked" in await _refused_refresh(pki, cp, rotated.refresh_token)
    for access in (stolen.access_token, rotated.access_token):
        code, details = await _audit_call(pki, cp, access)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    # The other login of the same user is untouched.
    assert (await _audit_call(pki, cp, other_login.access_token))[0] == grpc.StatusCode.OK
    assert (await _refresh(pki, cp, other_login.refresh_token)).refresh_token
    revoked = [row for row in _logins(cp) if row.revoked_at is not None]
    assert len(revoked) == 1 and "used twice" in revoked[0].revoked_reason


async def test_two_concurrent_refreshes_with_one_token_cannot_both_succeed(
    pki: Pki, control_plane: ControlPlane
) -> None:
    cp = control_plane
    first = await _login(pki, cp)
    outcomes = await asyncio.gather(
        *(_refresh(pki, cp, first.refresh_token) for _ in range(4)), return_exceptions=True
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) <= 1 and len(winners) + len(losers) == 4
    assert all(o.code() == grpc.StatusCode.UNAUTHENTICATED for o in losers)
    # A token presented twice is a reuse: whatever won, the login is revoked.
    for winner in winners:
        assert "revoked" in await _refused_refresh(pki, cp, winner.refresh_token)
    assert all(row.revoked_at is not None for row in _logins(cp))


async def test_reuse_ends_the_logins_open_streams_here_and_on_another_control_plane(
    pki: Pki,
    control_plane: ControlPlane,
    control_plane_factory: ControlPlaneFactory,
    tmp_path: pathlib.Path,
) -> None:
    here = control_plane
    elsewhere = await control_plane_factory(**_settings(tmp_path))
    stolen = await _login(pki, here)
    metadata = (("authorization", f"Bearer {stolen.access_token}"),)
    async with _channel(pki, here) as near, _channel(pki, elsewhere) as far:
        calls = [
            fleet_pb2_grpc.FleetServiceStub(channel).WatchAgents(
                fleet_pb2.WatchAgentsRequest(), metadata=metadata
            )
            for channel in (near, far)
        ]
        await eventually(lambda: len(here.streams) == 1 and len(elsewhere.streams) == 1)
        await _refresh(pki, here, stolen.refresh_token)
        await _refused_refresh(pki, here, stolen.refresh_token)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    await call.read()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "used twice" in (ended.value.details() or "")


async def test_deleting_a_user_deletes_its_logins(pki: Pki, control_plane: ControlPlane) -> None:
    cp = control_plane
    first = await _login(pki, cp)
    async with _channel(pki, cp, "operator", "admin") as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).DeleteUser(
            identity_pb2.DeleteUserRequest(username="alice")
        )
    assert _logins(cp) == []
    assert "no longer exists" in await _refused_refresh(pki, cp, first.refresh_token)
