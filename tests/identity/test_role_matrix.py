"""Every RPC against every role: the outcome matches the role table in controlplane/auth/roles.py.

A refused call is PERMISSION_DENIED; an allowed one gets past the interceptor (whatever the
method then answers to an empty request: INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED, a stream...).
Role "none" (a certificate of our CA without a usable SPIFFE id, and no bearer token) is
UNAUTHENTICATED for every method. With a bearer token, the logged-in user's role is the one the
table is applied to, whatever the certificate's role.
"""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sentinel.v1 import auth_pb2, auth_pb2_grpc, identity_pb2, identity_pb2_grpc

from controlplane import ControlPlane
from controlplane.auth.roles import METHOD_ROLES, allowed
from tests.conftest import Pki

ROLES = ("agent", "planner", "operator", "viewer")
_UNSERVED = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"  # v1alpha only is served
_STREAMING_REQUESTS = {
    "/sentinel.v1.AgentService/Connect",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}
_STREAMING_RESPONSES = {
    "/sentinel.v1.FleetService/WatchAgents",
    "/sentinel.v1.TelemetryService/StreamTelemetry",
    "/sentinel.v1.PlanService/WatchPlan",
    "/grpc.health.v1.Health/Watch",
}


async def _call(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    """Calls `method` with one empty message; returns the status it ends with (or OK when a
    stream is still open after its first response)."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method in _STREAMING_REQUESTS:
            call = channel.stream_stream(method, **identity)(iter([b""]), timeout=1)
            async for _ in call:
                return grpc.StatusCode.OK
        elif method in _STREAMING_RESPONSES:
            call = channel.unary_stream(method, **identity)(b"", timeout=1)
            async for _ in call:
                return grpc.StatusCode.OK
        else:
            await channel.unary_unary(method, **identity)(b"", timeout=1)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", ROLES)
async def test_every_method_answers_each_role_as_the_table_says(
    pki: Pki, control_plane: ControlPlane, role: str
) -> None:
    mismatches = []
    async with grpc.aio.secure_channel(
        f"localhost:{control_plane.port}", pki.channel_credentials(role, f"matrix-{role}")
    ) as channel:
        for method, allowed_roles in sorted(METHOD_ROLES.items()):
            if method == _UNSERVED:
                continue
            code = await _call(channel, method)
            refused = code == grpc.StatusCode.PERMISSION_DENIED
            if refused == (role in allowed_roles):
                mismatches.append(f"{method}: {code.name}")
            assert code != grpc.StatusCode.UNKNOWN, f"{method} crashed for {role}"
    assert mismatches == [], f"{role}: outcome differs from the role table"


def test_a_method_missing_from_the_table_is_refused_for_everyone() -> None:
    for role in ROLES:
        assert not allowed("/sentinel.v1.FleetService/DeleteEverything", role)


def no_spiffe_credentials(pki: Pki, san: list[x509.GeneralName]) -> grpc.ChannelCredentials:
    """Credentials with a client certificate of our CA whose SAN is `san` (no valid SPIFFE id)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem, None)
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nobody")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return grpc.ssl_channel_credentials(
        pki.ca_path.read_bytes(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate.public_bytes(serialization.Encoding.PEM),
    )


_NO_IDENTITY: dict[str, list[x509.GeneralName]] = {
    "dns-san-only": [x509.DNSName("nobody.example")],
    "unknown-role": [x509.UniformResourceIdentifier("spiffe://sentinel.local/root/nobody")],
    "foreign-trust-domain": [x509.UniformResourceIdentifier("spiffe://other.example/operator/x")],
    "not-spiffe": [x509.UniformResourceIdentifier("https://sentinel.local/operator/x")],
}


@pytest.mark.parametrize("variant", sorted(_NO_IDENTITY))
async def test_role_none_is_unauthenticated_for_every_method(
    pki: Pki, control_plane: ControlPlane, variant: str
) -> None:
    wrong = []
    credentials = no_spiffe_credentials(pki, _NO_IDENTITY[variant])
    async with grpc.aio.secure_channel(f"localhost:{control_plane.port}", credentials) as channel:
        for method in sorted(METHOD_ROLES):
            if method == _UNSERVED:
                continue
            code = await _call(channel, method)
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{method}: {code.name}")
    assert wrong == [], f"role none ({variant}) got past the interceptor"


async def _login(channel: grpc.aio.Channel, username: str, role: str) -> str:
    await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
        identity_pb2.CreateUserRequest(username=username, role=role, password="correct horse 1")
    )
    response = await auth_pb2_grpc.AuthServiceStub(channel).Login(
        auth_pb2.LoginRequest(username=username, password="correct horse 1")
    )
    return response.access_token


async def _call_with_token(channel: grpc.aio.Channel, method: str, token: str) -> grpc.StatusCode:
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        await channel.unary_unary(method, **identity)(
            b"", timeout=2, metadata=(("authorization", f"Bearer {token}"),)
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


_TOKEN_METHODS = (
    "/sentinel.v1.FleetService/ListAgents",
    "/sentinel.v1.AuditService/ListAuditEvents",
    "/sentinel.v1.PolicyService/DeletePolicy",
    "/sentinel.v1.IdentityService/ListUsers",
    "/sentinel.v1.AgentService/RenewCertificate",
)


@pytest.mark.parametrize("user_role", ["operator", "viewer"])
async def test_a_bearer_token_makes_the_users_role_the_one_the_table_checks(
    pki: Pki, control_plane: ControlPlane, user_role: str
) -> None:
    target = f"localhost:{control_plane.port}"
    async with grpc.aio.secure_channel(
        target, pki.channel_credentials("operator", "matrix-admin")
    ) as admin:
        token = await _login(admin, f"human-{user_role}", user_role)
    # An agent certificate: alone it may call none of these except RenewCertificate.
    async with grpc.aio.secure_channel(
        target, pki.channel_credentials("agent", "matrix-carrier")
    ) as channel:
        outcomes = {m: await _call_with_token(channel, m, token) for m in _TOKEN_METHODS}
    refused = {m for m, code in outcomes.items() if code == grpc.StatusCode.PERMISSION_DENIED}
    expected = {m for m in _TOKEN_METHODS if not allowed(m, user_role)}
    assert refused == expected, outcomes
    assert grpc.StatusCode.UNAUTHENTICATED not in outcomes.values()
