"""Password login: users with argon2id hashes, JWT access and refresh tokens carried as
`authorization: Bearer` metadata on mTLS connections, and rate-limited login attempts."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import grpc
import jwt
import pytest
from sentinel.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import ControlPlane
from controlplane.store._models import UserRow
from tests.conftest import ControlPlaneFactory, Pki

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
PASSWORD = "correct horse battery"
_ISSUER = "spiffe://sentinel.local"
_AUDIENCE = "sentinel-api"


@pytest.fixture
async def control_plane(
    control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> ControlPlane:
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_bytes(SECRET + b"\n")
    return await control_plane_factory(jwt_secret_file=str(secret_file))


def _channel(pki: Pki, cp: ControlPlane, role: str = "viewer", name: str = "laptop") -> Any:
    return grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))


async def _create_user(pki: Pki, cp: ControlPlane, username: str, role: str) -> None:
    async with _channel(pki, cp, "operator", "admin") as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
            identity_pb2.CreateUserRequest(username=username, role=role, password=PASSWORD)
        )


async def _login(pki: Pki, cp: ControlPlane, username: str, password: str = PASSWORD) -> Any:
    async with _channel(pki, cp) as channel:
        return await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(username=username, password=password)
        )


async def _list_audit(pki: Pki, cp: ControlPlane, token: str | None) -> grpc.StatusCode:
    """Calls an operator-only method from a viewer certificate with `token` as bearer."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    async with _channel(pki, cp) as channel:
        try:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(), metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _token(good: str, **overrides: Any) -> str:
    """A token signed with the control plane's secret: the claims of `good` (a real access
    token, so its login exists) with `overrides` (None removes a claim)."""
    now = int(time.time())
    claims = jwt.decode(good, options={"verify_signature": False})
    claims.update(iss=_ISSUER, aud=_AUDIENCE, sub="alice", typ="access", iat=now, exp=now + 300)
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, "HS256")


async def test_an_operators_access_token_works_for_operator_methods(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")
    response = await _login(pki, control_plane, "alice")
    assert response.access_token and response.refresh_token
    assert response.access_token_expire_time.seconds > time.time()
    assert await _list_audit(pki, control_plane, response.access_token) == grpc.StatusCode.OK
    # The same viewer certificate alone may not.
    assert await _list_audit(pki, control_plane, None) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_viewer_user_may_not_call_operator_methods(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "vera", "viewer")
    token = (await _login(pki, control_plane, "vera")).access_token
    async with _channel(pki, control_plane, "operator", "shared-host") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
    # Never the operator certificate's role once a token is presented.
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "user:vera" in (refused.value.details() or "")


async def test_wrong_password_and_unknown_user_fail_alike(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")
    failures = []
    for username, password in (("alice", "not the password"), ("mallory", PASSWORD)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _login(pki, control_plane, username, password)
        failures.append((refused.value.code(), refused.value.details()))
    assert failures[0] == failures[1]
    assert failures[0][0] == grpc.StatusCode.UNAUTHENTICATED


def _change_char(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


def _tampered_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload}.{_change_char(signature, len(signature) // 2)}"


def _tampered_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{_change_char(payload, len(payload) // 2)}.{signature}"


def _unsigned(token: str) -> str:
    payload = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(payload, None, algorithm="none")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda good: _token(good, exp=int(time.time()) - 5), id="expired"),
        pytest.param(_tampered_signature, id="tampered-signature"),
        pytest.param(_tampered_payload, id="tampered-payload"),
        pytest.param(
            lambda good: jwt.encode(
                jwt.decode(good, options={"verify_signature": False}), b"k" * 40, "HS256"
            ),
            id="other-key",
        ),
        pytest.param(_unsigned, id="alg-none"),
        pytest.param(lambda good: _token(good, typ="refresh"), id="refresh-as-access"),
        pytest.param(lambda good: _token(good, aud="someone-else"), id="wrong-audience"),
        pytest.param(lambda good: _token(good, iss="spiffe://other.example"), id="wrong-issuer"),
        pytest.param(lambda good: _token(good, typ=None), id="missing-typ"),
        pytest.param(lambda good: _token(good, sid=None), id="missing-login"),
        pytest.param(lambda good: _token(good, sid="f" * 32), id="unknown-login"),
        pytest.param(lambda good: _token(good, jti=None), id="missing-token-id"),
        pytest.param(lambda good: _token(good, sub="nobody"), id="unknown-user"),
        pytest.param(lambda good: "not-a-jwt", id="garbage"),
        pytest.param(lambda good: "", id="empty"),
    ],
)
async def test_an_invalid_bearer_token_is_unauthenticated(
    pki: Pki, control_plane: ControlPlane, make_token: Any
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")
    good = _token((await _login(pki, control_plane, "alice")).access_token)
    assert await _list_audit(pki, control_plane, good) == grpc.StatusCode.OK
    assert await _list_audit(pki, control_plane, make_token(good)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def test_a_refresh_token_from_login_is_not_an_access_token(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")
    response = await _login(pki, control_plane, "alice")
    code = await _list_audit(pki, control_plane, response.refresh_token)
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_malformed_authorization_header_is_not_ignored(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _channel(pki, control_plane, "operator", "admin") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(), metadata=(("authorization", "Basic YWxpY2U="),)
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_refresh_rotates_the_pair_and_is_refused_once_the_user_is_deleted(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")
    first = await _login(pki, control_plane, "alice")
    async with _channel(pki, control_plane) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        second = await auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token))
        assert second.refresh_token != first.refresh_token
        assert await _list_audit(pki, control_plane, second.access_token) == grpc.StatusCode.OK
        with pytest.raises(grpc.aio.AioRpcError) as wrong_kind:
            await auth.Refresh(auth_pb2.RefreshRequest(refresh_token=second.access_token))
        assert wrong_kind.value.code() == grpc.StatusCode.UNAUTHENTICATED

        async with _channel(pki, control_plane, "operator", "admin") as admin:
            await identity_pb2_grpc.IdentityServiceStub(admin).DeleteUser(
                identity_pb2.DeleteUserRequest(username="alice")
            )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth.Refresh(auth_pb2.RefreshRequest(refresh_token=second.refresh_token))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await _list_audit(pki, control_plane, second.access_token) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def _attempts_until_exhausted(
    pki: Pki, cp: ControlPlane, usernames: list[str]
) -> tuple[int, grpc.aio.AioRpcError]:
    for index, username in enumerate(usernames):
        try:
            await _login(pki, cp, username, "wrong password!")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return index, exc
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
    raise AssertionError("never rate-limited")


async def test_logins_are_rate_limited_per_user(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory(login_rate_per_minute=2)
    allowed, exhausted = await _attempts_until_exhausted(pki, cp, ["alice"] * 5)
    assert allowed == 2
    retry_ms = int(dict(exhausted.trailing_metadata())["retry-after-ms"])
    assert 0 < retry_ms <= 30_000
    assert "retry in" in (exhausted.details() or "")
    # Another user from the same address is not held back by alice's attempts.
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await _login(pki, cp, "bob", "wrong password!")
    assert other.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_logins_are_rate_limited_per_address(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory(login_rate_per_minute=2)
    allowed, exhausted = await _attempts_until_exhausted(pki, cp, [f"u{i}" for i in range(20)])
    assert allowed == 8  # four times one user's allowance
    assert "retry-after-ms" in dict(exhausted.trailing_metadata())


async def test_the_users_table_holds_an_argon2id_hash_not_the_password(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")

    def read(session: Session) -> str:
        return session.scalars(select(UserRow.password_hash)).one()

    stored = await control_plane.store.run(read)
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"username": "bad name", "role": "operator", "password": PASSWORD}, "username"),
        ({"username": "", "role": "operator", "password": PASSWORD}, "username"),
        ({"username": "carol", "role": "agent", "password": PASSWORD}, "role"),
        ({"username": "carol", "role": "operator", "password": "short pw 11"}, "password"),
    ],
)
async def test_create_user_validation_names_the_field(
    pki: Pki, control_plane: ControlPlane, fields: dict[str, str], field: str
) -> None:
    async with _channel(pki, control_plane, "operator", "admin") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
                identity_pb2.CreateUserRequest(**fields)
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(f"{field}: ")


async def test_users_are_listed_and_duplicates_and_unknown_deletes_are_refused(
    pki: Pki, control_plane: ControlPlane
) -> None:
    await _create_user(pki, control_plane, "alice", "operator")
    await _create_user(pki, control_plane, "vera", "viewer")
    async with _channel(pki, control_plane, "operator", "admin") as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as duplicate:
            await stub.CreateUser(
                identity_pb2.CreateUserRequest(username="alice", role="viewer", password=PASSWORD)
            )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.DeleteUser(identity_pb2.DeleteUserRequest(username="nobody"))
        first = await stub.ListUsers(identity_pb2.ListUsersRequest(page_size=1))
        second = await stub.ListUsers(
            identity_pb2.ListUsersRequest(page_size=1, page_token=first.next_page_token)
        )
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(u.username, u.role) for u in [*first.users, *second.users]] == [
        ("alice", "operator"),
        ("vera", "viewer"),
    ]
    assert second.next_page_token == ""
