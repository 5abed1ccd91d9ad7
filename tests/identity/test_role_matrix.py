"""Every RPC against every role: the outcome matches the role table in controlplane/auth/roles.py,
and that table matches the one README.md shows.

A refused call is PERMISSION_DENIED; an allowed one gets the answer the method itself gives to
an empty request, stated per method in `_ALLOWED_OUTCOME`. Role "none" (a certificate of our CA
without a usable SPIFFE id, and no bearer token) is UNAUTHENTICATED for every method. With a
bearer token, the logged-in user's role is the one the table is applied to, whatever the
certificate's role.
"""

from __future__ import annotations

import datetime as dt
import importlib
import pathlib
import pkgutil
import re

import grpc
import pytest
import sentinel.v1 as sentinel_v1
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
    "/sentinel.v1.EventService/WatchEvents",
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


_OK = grpc.StatusCode.OK
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
# What each method answers a caller whose role may call it, to the one empty message `_call`
# sends: OK where an empty request is a valid one, else the method's own refusal of it.
_ALLOWED_OUTCOME: dict[str, grpc.StatusCode] = {
    "/sentinel.v1.AgentService/Connect": _INVALID,  # the first message is not a hello
    "/sentinel.v1.AgentService/RenewCertificate": _INVALID,  # no CSR
    "/sentinel.v1.AuthService/Login": grpc.StatusCode.UNAUTHENTICATED,  # no such user
    "/sentinel.v1.AuthService/Refresh": grpc.StatusCode.UNAUTHENTICATED,  # no refresh token
    "/sentinel.v1.FleetService/ListAgents": _OK,
    "/sentinel.v1.FleetService/GetAgent": _INVALID,  # no node_id
    # A watch stays open and, with no agent in the fleet, has nothing to send: the call's own
    # 1 s deadline ends it (a refused one would end at once).
    "/sentinel.v1.FleetService/WatchAgents": grpc.StatusCode.DEADLINE_EXCEEDED,
    "/sentinel.v1.TelemetryService/GetNodeTelemetry": _INVALID,  # no node_id
    "/sentinel.v1.TelemetryService/GetFleetTelemetry": _OK,
    "/sentinel.v1.TelemetryService/StreamTelemetry": grpc.StatusCode.DEADLINE_EXCEEDED,
    "/sentinel.v1.EventService/ListEvents": _OK,
    # From now on, and nothing happens in the second it stays open.
    "/sentinel.v1.EventService/WatchEvents": grpc.StatusCode.DEADLINE_EXCEEDED,
    "/sentinel.v1.PlanService/SubmitPlan": _INVALID,  # no plan
    "/sentinel.v1.PlanService/GetPlan": _INVALID,  # no plan_id
    "/sentinel.v1.PlanService/GetPlanOutcome": _INVALID,  # no plan_id
    "/sentinel.v1.PlanService/ListPlans": _OK,
    "/sentinel.v1.PlanService/WatchPlan": _INVALID,  # no plan_id
    "/sentinel.v1.PlanService/ApprovePlan": _INVALID,  # no plan_id
    "/sentinel.v1.PlanService/CancelPlan": _INVALID,  # no plan_id
    "/sentinel.v1.PolicyService/ListPolicies": _OK,
    "/sentinel.v1.PolicyService/GetPolicy": _INVALID,  # no policy_id
    "/sentinel.v1.PolicyService/CreatePolicy": _INVALID,  # no policy
    "/sentinel.v1.PolicyService/UpdatePolicy": _INVALID,  # no policy
    "/sentinel.v1.PolicyService/DeletePolicy": _INVALID,  # no policy_id
    "/sentinel.v1.AuditService/ListAuditEvents": _OK,
    "/sentinel.v1.EnrollmentService/CreateBootstrapToken": _INVALID,  # no node_pattern
    "/sentinel.v1.IdentityService/RevokeCertificate": _INVALID,  # no serial
    "/sentinel.v1.IdentityService/RevokeNode": _INVALID,  # no node_id
    "/sentinel.v1.IdentityService/ListRevocations": _OK,
    "/sentinel.v1.IdentityService/CreateUser": _INVALID,  # no username
    "/sentinel.v1.IdentityService/DeleteUser": _INVALID,  # username: required
    "/sentinel.v1.IdentityService/ListUsers": _OK,
    "/sentinel.v1.AutonomyService/GetAutonomyStatus": _OK,
    "/sentinel.v1.AutonomyService/GetPlannerCalibration": _INVALID,  # source: required
    "/sentinel.v1.AutonomyService/ResetBreaker": _INVALID,  # reason: required
    "/grpc.health.v1.Health/Check": _OK,
    "/grpc.health.v1.Health/Watch": _OK,  # its first message, SERVING
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _OK,
}


def test_every_served_method_has_its_allowed_outcome_stated() -> None:
    assert set(_ALLOWED_OUTCOME) == set(METHOD_ROLES) - {_UNSERVED}


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
            expected = (
                _ALLOWED_OUTCOME[method]
                if role in allowed_roles
                else grpc.StatusCode.PERMISSION_DENIED
            )
            code = await _call(channel, method)
            if code != expected:
                mismatches.append(f"{method}: {code.name}, expected {expected.name}")
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
    expected = {
        m: _ALLOWED_OUTCOME[m] if allowed(m, user_role) else grpc.StatusCode.PERMISSION_DENIED
        for m in _TOKEN_METHODS
    }
    assert outcomes == expected


# -- the README's role table -----------------------------------------------------------------

_README = pathlib.Path(__file__).parents[2] / "README.md"
# How the README's words name methods: an area of the API is a service, "read" is the methods
# that only look (Get, List, Watch, Stream), "submit"/"cancel" the method of that verb, and an
# area named without a verb (after "plus") is all of it.
_AREAS = {
    "fleet": "FleetService",
    "telemetry": "TelemetryService",
    "plans": "PlanService",
    "policies": "PolicyService",
    "audit": "AuditService",
    "events": "EventService",
    "autonomy": "AutonomyService",
}
_SPECIAL = {"approvals": ("PlanService", "ApprovePlan")}
_READ_PREFIXES = ("Get", "List", "Watch", "Stream")


def _api_methods() -> dict[str, list[str]]:
    """Every sentinel.v1 service and its methods, from the generated descriptors."""
    services: dict[str, list[str]] = {}
    for module in pkgutil.iter_modules(sentinel_v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"sentinel.v1.{module.name}").DESCRIPTOR
            for service in descriptor.services_by_name.values():
                services[service.name] = [m.name for m in service.methods]
    return services


def _readme_role_rows() -> dict[str, str]:
    section = _README.read_text().split("## Identities and roles", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def _methods_granted(description: str, rows: dict[str, str]) -> set[str]:
    """The full method names one row of the README's table grants."""
    services = _api_methods()
    granted: set[str] = set()
    text = re.sub(r"\([^)]*\)", "", description)  # remarks, not grants
    inherited = re.match(r"everything an? (\w+) may,?\s*(?:plus\s+)?", text)
    if inherited:
        granted |= _methods_granted(rows[inherited.group(1)], rows)
        text, verbs = text[inherited.end() :], ["all"]
    else:
        verbs = []
    for service in re.findall(r"`(\w+Service)`", text):
        granted |= {f"/sentinel.v1.{service}/{m}" for m in services[service]}
    for service, method in re.findall(r"`(\w+Service)/(\w+)`", text):
        assert method in services[service], f"README role table: no {service}/{method}"
        granted.add(f"/sentinel.v1.{service}/{method}")
    text = re.sub(r"`\w+Service(/\w+)?`", "", text)
    for clause in filter(None, (c.strip() for c in text.split(","))):
        words = [w for w in clause.split() if w != "and"]
        named_verbs = [w for w in words if w in ("read", "submit", "cancel")]
        verbs = named_verbs or verbs
        for word in words:
            if word in _SPECIAL:
                service, method = _SPECIAL[word]
                granted.add(f"/sentinel.v1.{service}/{method}")
            elif word in _AREAS:
                service = _AREAS[word]
                for verb in verbs:
                    granted |= {
                        f"/sentinel.v1.{service}/{m}"
                        for m in services[service]
                        if verb == "all"
                        or (verb == "read" and m.startswith(_READ_PREFIXES))
                        or m == f"{verb.capitalize()}{word.capitalize()[:-1]}"
                    }
            elif word not in named_verbs:
                raise AssertionError(f"README role table: no meaning for {word!r} in {clause!r}")
    return granted


def test_the_readme_role_table_is_read_as_written() -> None:
    rows = _readme_role_rows()
    assert sorted(rows) == sorted(ROLES)
    assert _methods_granted(rows["viewer"], rows) == {
        f"/sentinel.v1.{service}/{method}"
        for service, method in (
            ("FleetService", "ListAgents"),
            ("FleetService", "GetAgent"),
            ("FleetService", "WatchAgents"),
            ("TelemetryService", "GetNodeTelemetry"),
            ("TelemetryService", "GetFleetTelemetry"),
            ("TelemetryService", "StreamTelemetry"),
            ("PlanService", "GetPlan"),
            ("PlanService", "ListPlans"),
            ("PlanService", "WatchPlan"),
            ("PlanService", "GetPlanOutcome"),
            ("PolicyService", "ListPolicies"),
            ("PolicyService", "GetPolicy"),
            ("EventService", "ListEvents"),
            ("EventService", "WatchEvents"),
            ("AutonomyService", "GetAutonomyStatus"),
            ("AutonomyService", "GetPlannerCalibration"),
        )
    }


# AuthService is open to every certificate (the password or refresh token is what
# authenticates; README, "Logging in with a password"); health and reflection are not Sentinel's
# API. The README's table is about the rest.
_OUTSIDE_THE_TABLE = ("/sentinel.v1.AuthService/", "/grpc.")


@pytest.mark.parametrize(
    "role",
    [
        "agent",
        "planner",
        "operator",
        "viewer",
    ],
)
def test_the_role_table_in_roles_py_matches_the_readme(role: str) -> None:
    rows = _readme_role_rows()
    in_readme = _methods_granted(rows[role], rows)
    in_roles_py = {
        method
        for method in METHOD_ROLES
        if allowed(method, role) and not method.startswith(_OUTSIDE_THE_TABLE)
    }
    assert {
        "only in roles.py": sorted(in_roles_py - in_readme),
        "only in README.md": sorted(in_readme - in_roles_py),
    } == {"only in roles.py": [], "only in README.md": []}


def test_what_is_outside_the_readme_table_is_open_to_every_role() -> None:
    outside = {m for m in METHOD_ROLES if m.startswith(_OUTSIDE_THE_TABLE)}
    assert {m for m in outside if not all(allowed(m, role) for role in ROLES)} == set()
