"""Enrollment with bootstrap tokens, certificate renewal, and the agent's side of both, over
real TLS on loopback: the enrollment port (no client certificate) and the main port."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import logging
import os
import pathlib
import socket
import stat
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.protobuf import duration_pb2
from sentinel.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
)
from sqlalchemy import select, update

from certs import Identity, make_key_and_csr
from controlplane import ControlPlane
from controlplane.store import AUDIT_EVENTS, BOOTSTRAP_TOKENS, ISSUED_CERTIFICATES
from nodeagent import main as agent_main
from nodeagent._certificates import read_certificate
from sentinelctl import cli as ctl
from tests.conftest import (
    TRUST_DOMAIN,
    AgentFactory,
    ControlPlaneFactory,
    Pki,
    RunningAgent,
    eventually,
)

ENROLL = "/sentinel.v1.EnrollmentService/Enroll"


def _csr(node: str) -> str:
    return make_key_and_csr(Identity(TRUST_DOMAIN, "agent", node))[1].decode()


def _enrollment_channel(pki: Pki, cp: ControlPlane) -> grpc.aio.Channel:
    """Server-only TLS, as a node that holds nothing but ca.pem and a token."""
    credentials = grpc.ssl_channel_credentials(pki.ca_path.read_bytes())
    return grpc.aio.secure_channel(f"localhost:{cp.enrollment_port}", credentials)


def _main_channel(pki: Pki, cp: ControlPlane, role: str, name: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))


async def _create_token(
    pki: Pki, cp: ControlPlane, pattern: str, *, uses: int = 0, ttl_s: float | None = None
) -> enrollment_pb2.CreateBootstrapTokenResponse:
    request = enrollment_pb2.CreateBootstrapTokenRequest(node_pattern=pattern, max_uses=uses)
    if ttl_s is not None:
        request.ttl.FromNanoseconds(int(ttl_s * 1e9))
    async with _main_channel(pki, cp, "operator", "admin") as channel:
        return await enrollment_pb2_grpc.EnrollmentServiceStub(channel).CreateBootstrapToken(
            request
        )


async def _enroll(
    pki: Pki, cp: ControlPlane, token: str, node: str, csr_pem: str | None = None
) -> enrollment_pb2.EnrollResponse:
    async with _enrollment_channel(pki, cp) as channel:
        return await enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(
                token=token, node_id=node, csr_pem=_csr(node) if csr_pem is None else csr_pem
            )
        )


async def _issued(cp: ControlPlane) -> Sequence[Any]:
    return await cp.store.run_core(
        lambda db: db.execute(select(ISSUED_CERTIFICATES).order_by("issued_at")).all()
    )


async def _audited(cp: ControlPlane, method: str) -> Sequence[Any]:
    await cp.audit.flush()
    return await cp.store.run_core(
        lambda db: db.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.method == method)).all()
    )


def _agent_files(tmp_path: pathlib.Path, node: str) -> dict[str, Any]:
    return {
        "cert": tmp_path / f"enrolled-{node}" / "agent.pem",
        "key": tmp_path / f"enrolled-{node}" / "agent.key",
    }


async def _start_enrolling_agent(
    agent_factory: AgentFactory,
    cp: ControlPlane,
    tmp_path: pathlib.Path,
    node: str,
    token: str,
    **overrides: Any,
) -> RunningAgent:
    return await agent_factory(
        node,
        cp.port,
        bootstrap_token=token,
        enrollment_endpoint=f"localhost:{cp.enrollment_port}",
        **{**_agent_files(tmp_path, node), **overrides},
    )


def _gauge(agent: RunningAgent, name: str) -> float:
    for family in agent.agent.metrics_collector().collect():
        if family.name == name:
            return float(family.samples[0].value)
    raise AssertionError(f"no metric {name}")


# -- enrollment end to end ---------------------------------------------------------------------


async def test_new_agent_enrolls_from_only_the_ca_and_a_token_and_streams_telemetry(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cp = control_plane
    token = await _create_token(pki, cp, "gpu-node-*")
    files = _agent_files(tmp_path, "gpu-node-1")
    assert not files["cert"].exists()

    running = await _start_enrolling_agent(agent_factory, cp, tmp_path, "gpu-node-1", token.token)

    cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    cert.verify_directly_issued_by(pki.ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/agent/gpu-node-1"
    ]
    assert stat.S_IMODE(os.stat(files["key"]).st_mode) == 0o600
    [row] = await _issued(cp)
    assert (row.serial, row.node_id, row.via) == (
        format(cert.serial_number, "x"),
        "gpu-node-1",
        "enroll",
    )
    async with _main_channel(pki, cp, "viewer", "dashboard") as channel:
        agents = await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
            fleet_pb2.ListAgentsRequest()
        )
    assert [(a.node_id, a.status) for a in agents.agents] == [
        ("gpu-node-1", fleet_pb2.AGENT_STATUS_CONNECTED)
    ]
    await eventually(lambda: cp.hub.latest("gpu-node-1") is not None)
    assert _gauge(running, "sentinel_agent_certificate_valid") == 1.0
    [event] = await _audited(cp, ENROLL)
    assert (event.principal, event.target, event.outcome) == (
        "peer 127.0.0.1",
        "node/gpu-node-1",
        "OK",
    )
    secret = token.token.split(".")[1]
    key_body = files["key"].read_text().splitlines()[1]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert secret not in logged
    assert key_body not in logged


# -- refusals ------------------------------------------------------------------------------------


def _rsa_csr(bits: int, node: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"agent/{node}")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _tampered_csr(node: str) -> str:
    """A CSR whose signature does not verify: the last byte of its DER (inside the signature
    value) is changed."""
    der = bytearray(
        x509.load_pem_x509_csr(_csr(node).encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


REFUSALS = [
    # (case, node id, what to do to the token, CSR factory, code, message start)
    ("unknown token", "gpu-node-1", "unknown", None, grpc.StatusCode.UNAUTHENTICATED, "token:"),
    ("garbage token", "gpu-node-1", "garbage", None, grpc.StatusCode.UNAUTHENTICATED, "token:"),
    ("expired token", "gpu-node-1", "expire", None, grpc.StatusCode.UNAUTHENTICATED, "token:"),
    ("wrong scope", "cpu-node-1", "", None, grpc.StatusCode.PERMISSION_DENIED, "token:"),
    (
        "malformed CSR",
        "gpu-node-1",
        "",
        lambda node: "-----BEGIN CERTIFICATE REQUEST-----\nnope\n",
        grpc.StatusCode.INVALID_ARGUMENT,
        "csr_pem:",
    ),
    (
        "CSR for another identity",
        "gpu-node-1",
        "",
        lambda node: _csr("gpu-node-2"),
        grpc.StatusCode.PERMISSION_DENIED,
        "csr_pem:",
    ),
    (
        "weak RSA key",
        "gpu-node-1",
        "",
        lambda node: _rsa_csr(1024, node),
        grpc.StatusCode.INVALID_ARGUMENT,
        "csr_pem:",
    ),
    (
        "bad CSR signature",
        "gpu-node-1",
        "",
        _tampered_csr,
        grpc.StatusCode.INVALID_ARGUMENT,
        "csr_pem:",
    ),
    ("invalid node id", "gpu-node-1/../x", "", None, grpc.StatusCode.INVALID_ARGUMENT, "node_id:"),
]


@pytest.mark.parametrize(
    ("node", "token_change", "csr", "code", "prefix"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_enrollment_is_refused_with_a_precise_code_issues_nothing_and_is_audited(
    pki: Pki,
    control_plane: ControlPlane,
    node: str,
    token_change: str,
    csr: Any,
    code: grpc.StatusCode,
    prefix: str,
) -> None:
    cp = control_plane
    created = await _create_token(pki, cp, "gpu-node-*")
    token = created.token
    if token_change == "unknown":
        token = "0123456789abcdef." + created.token.split(".")[1]
    elif token_change == "garbage":
        token = "not-a-token"
    elif token_change == "expire":
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        await cp.store.run_core(
            lambda db: db.execute(update(BOOTSTRAP_TOKENS).values(expires_at=past))
        )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _enroll(pki, cp, token, node, csr(node) if csr else None)

    assert refused.value.code() == code
    assert refused.value.details().startswith(prefix), refused.value.details()
    assert created.token.split(".")[1] not in refused.value.details()
    assert await _issued(cp) == []
    [event] = await _audited(cp, ENROLL)
    assert (event.principal, event.outcome) == ("peer 127.0.0.1", code.name)


async def test_single_use_token_cannot_be_used_twice(pki: Pki, control_plane: ControlPlane) -> None:
    cp = control_plane
    token = (await _create_token(pki, cp, "gpu-node-*")).token
    await _enroll(pki, cp, token, "gpu-node-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _enroll(pki, cp, token, "gpu-node-2")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "used up" in refused.value.details()
    assert [row.node_id for row in await _issued(cp)] == ["gpu-node-1"]
    assert [e.outcome for e in await _audited(cp, ENROLL)] == ["OK", "UNAUTHENTICATED"]


async def test_refused_csr_does_not_use_up_the_token(pki: Pki, control_plane: ControlPlane) -> None:
    cp = control_plane
    token = (await _create_token(pki, cp, "gpu-node-1")).token
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _enroll(pki, cp, token, "gpu-node-1", "not a csr")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("csr_pem: "), refused.value.details()
    response = await _enroll(pki, cp, token, "gpu-node-1")
    assert "BEGIN CERTIFICATE" in response.certificate_pem


async def test_token_with_several_uses_enrolls_that_many_nodes(
    pki: Pki, control_plane: ControlPlane
) -> None:
    cp = control_plane
    token = (await _create_token(pki, cp, "gpu-node-*", uses=2)).token
    await _enroll(pki, cp, token, "gpu-node-1")
    await _enroll(pki, cp, token, "gpu-node-2")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _enroll(pki, cp, token, "gpu-node-3")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_two_concurrent_enrollments_with_one_single_use_token_only_one_succeeds(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    # Two control planes on one database: the use is taken by the database, not by a lock in
    # one process.
    first = await control_plane_factory(enrollment_listen="127.0.0.1:0")
    second = await control_plane_factory(enrollment_listen="127.0.0.1:0")
    for attempt in range(5):
        token = (await _create_token(pki, first, f"race-{attempt}-*")).token
        outcomes = await asyncio.gather(
            _enroll(pki, first, token, f"race-{attempt}-a"),
            _enroll(pki, second, token, f"race-{attempt}-b"),
            return_exceptions=True,
        )
        succeeded = [o for o in outcomes if isinstance(o, enrollment_pb2.EnrollResponse)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(succeeded) == 1, outcomes
        assert [r.code() for r in refused] == [grpc.StatusCode.UNAUTHENTICATED]
    assert len(await _issued(first)) == 5


def _dual_stack_loopback() -> bool:
    """Whether one socket on [::] takes connections from both 127.0.0.1 and ::1 here, as the
    control plane's listener does (gRPC turns IPV6_V6ONLY off)."""
    try:
        with socket.socket(socket.AF_INET6) as listener:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(("::", 0))
            listener.listen()
            port = listener.getsockname()[1]
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.socket(family) as client:
                    client.settimeout(2)
                    client.connect((host, port))
    except OSError:
        return False
    return True


async def _enroll_from(pki: Pki, address: str, port: int) -> grpc.aio.AioRpcError:
    """One enrollment attempt with a bad token, connecting to `address` (so coming from the
    loopback address of that family); returns the refusal."""
    host = f"[{address}]" if ":" in address else address
    credentials = grpc.ssl_channel_credentials(pki.ca_path.read_bytes())
    async with grpc.aio.secure_channel(f"{host}:{port}", credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(
                    token="not-a-token", node_id="gpu-node-1", csr_pem=_csr("gpu-node-1")
                )
            )
    return refused.value


_needs_ipv6 = pytest.mark.skipif(
    not _dual_stack_loopback(), reason="no IPv6 loopback (::1) next to 127.0.0.1 here"
)


@_needs_ipv6
async def test_enrollment_is_rate_limited_per_peer_address(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    # Listening on every address of both families: callers from 127.0.0.1 and from ::1 are two
    # peers, each with its own allowance of 2 attempts a minute.
    cp = await control_plane_factory(enroll_rate_per_minute=2, enrollment_listen="[::]:0")
    refused, limited = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED
    port = cp.enrollment_port
    from_v4 = [await _enroll_from(pki, "127.0.0.1", port) for _ in range(3)]
    assert [e.code() for e in from_v4] == [refused, refused, limited]
    assert "too many enrollment attempts from 127.0.0.1: retry in" in from_v4[2].details()
    retry_ms = dict(from_v4[2].trailing_metadata() or ())["retry-after-ms"]
    assert 0 < int(retry_ms) <= 30_000
    # The other address still has its whole allowance, and the first one stays limited.
    from_v6 = [await _enroll_from(pki, "::1", port) for _ in range(3)]
    assert [e.code() for e in from_v6] == [refused, refused, limited]
    assert (await _enroll_from(pki, "127.0.0.1", port)).code() == limited
    # The attempts that got through are audited, two under each caller's address.
    principals = collections.Counter(e.principal for e in await _audited(cp, ENROLL))
    assert principals.pop("peer 127.0.0.1") == 2
    assert list(principals.values()) == [2]


@_needs_ipv6
async def test_an_ipv6_caller_is_named_by_its_address(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory(enrollment_listen="[::]:0")
    assert (await _enroll_from(pki, "::1", cp.enrollment_port)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    [event] = await _audited(cp, ENROLL)
    assert event.principal == "peer ::1"


# -- what each port serves -------------------------------------------------------------------


async def test_enrollment_port_serves_nothing_but_enroll(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _enrollment_channel(pki, control_plane) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as fleet:
            await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(fleet_pb2.ListAgentsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as token:
            await enrollment_pb2_grpc.EnrollmentServiceStub(channel).CreateBootstrapToken(
                enrollment_pb2.CreateBootstrapTokenRequest(node_pattern="*")
            )
    for refused in (fleet, token):
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "serves only" in refused.value.details()


async def test_main_port_refuses_enroll(pki: Pki, control_plane: ControlPlane) -> None:
    token = (await _create_token(pki, control_plane, "gpu-node-*")).token
    async with _main_channel(pki, control_plane, "operator", "admin") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(
                    token=token, node_id="gpu-node-1", csr_pem=_csr("gpu-node-1")
                )
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await _issued(control_plane) == []


async def test_without_the_ca_key_enroll_and_renew_say_what_to_configure(
    pki: Pki, control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> None:
    cp = await control_plane_factory(ca_key=str(tmp_path / "missing-ca.key"))
    token = (await _create_token(pki, cp, "gpu-node-*")).token
    with pytest.raises(grpc.aio.AioRpcError) as enroll:
        await _enroll(pki, cp, token, "gpu-node-1")
    async with _main_channel(pki, cp, "agent", "gpu-node-1") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as renew:
            await agent_pb2_grpc.AgentServiceStub(channel).RenewCertificate(
                agent_pb2.RenewCertificateRequest(csr_pem=_csr("gpu-node-1"))
            )
    for refused in (enroll, renew):
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ca_key" in refused.value.details()


# -- renewal -----------------------------------------------------------------------------------


async def test_renewal_refuses_a_csr_for_another_node(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _main_channel(pki, control_plane, "agent", "gpu-node-1") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await stub.RenewCertificate(
                agent_pb2.RenewCertificateRequest(csr_pem=_csr("gpu-node-2"))
            )
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await stub.RenewCertificate(agent_pb2.RenewCertificateRequest(csr_pem="x"))
        renewed = await stub.RenewCertificate(
            agent_pb2.RenewCertificateRequest(csr_pem=_csr("gpu-node-1"))
        )
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert malformed.value.details().startswith("csr_pem:")
    cert = x509.load_pem_x509_certificate(renewed.certificate_pem.encode())
    assert [(r.node_id, r.via) for r in await _issued(control_plane)] == [("gpu-node-1", "renew")]
    assert [r.serial for r in await _issued(control_plane)] == [format(cert.serial_number, "x")]


async def test_agent_renews_before_expiry_without_dropping_its_session(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(agent_certificate_lifetime_s=6.0)
    token = (await _create_token(pki, cp, "gpu-node-1")).token
    running = await _start_enrolling_agent(agent_factory, cp, tmp_path, "gpu-node-1", token)
    files = _agent_files(tmp_path, "gpu-node-1")
    enrolled = read_certificate(files["cert"])
    session_id = running.agent.session_id

    await eventually(lambda: running.agent.certificates.renewals >= 1, timeout=15)

    renewed = read_certificate(files["cert"])
    assert renewed.serial != enrolled.serial
    assert renewed.not_after > enrolled.not_after
    assert stat.S_IMODE(os.stat(files["key"]).st_mode) == 0o600
    assert running.agent.session_id == session_id
    assert running.agent.sessions_opened == 1
    assert "renew" in [row.via for row in await _issued(cp)]

    # Once the first certificate has expired, only the renewed one can open a new session.
    await eventually(lambda: dt.datetime.now(dt.UTC) > enrolled.not_after, timeout=10)
    cp.registry.session_for("gpu-node-1").close("test: forced reconnect")
    await eventually(
        lambda: running.agent.sessions_opened == 2 and running.agent.connected.is_set()
    )
    on_disk = read_certificate(files["cert"])
    session = cp.registry.session_for("gpu-node-1")
    assert session is not None and on_disk is not None
    assert session.certificate_serial == format(on_disk.serial, "x")


async def test_agent_with_expired_certificate_reenrolls_with_a_token(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = control_plane
    cert, key = pki.client(
        "agent",
        "gpu-node-7",
        valid_for=dt.timedelta(hours=1),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
        tag="-expired",
    )
    files = _agent_files(tmp_path, "gpu-node-7")
    files["cert"].parent.mkdir(parents=True)
    files["cert"].write_bytes(cert.read_bytes())
    files["key"].write_bytes(key.read_bytes())
    token = (await _create_token(pki, cp, "gpu-node-7")).token

    running = await _start_enrolling_agent(agent_factory, cp, tmp_path, "gpu-node-7", token)

    assert running.agent.certificates.enrollments == 1
    assert read_certificate(files["cert"]).not_after > dt.datetime.now(dt.UTC)
    assert [(row.node_id, row.via) for row in await _issued(cp)] == [("gpu-node-7", "enroll")]


async def test_agent_with_expired_certificate_and_no_token_reports_it_and_keeps_waiting(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_before = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    cert, key = pki.client(
        "agent",
        "gpu-node-8",
        valid_for=dt.timedelta(hours=1),
        not_before=not_before,
        tag="-expired",
    )
    caplog.set_level(logging.ERROR, logger="nodeagent")
    running = await agent_factory(
        "gpu-node-8", control_plane.port, cert=cert, key=key, wait_connected=False
    )

    await eventually(lambda: any("no bootstrap token" in r.getMessage() for r in caplog.records))
    assert _gauge(running, "sentinel_agent_certificate_valid") == 0.0
    assert _gauge(running, "sentinel_agent_certificate_expiry_timestamp_seconds") == (
        (not_before + dt.timedelta(hours=1)).timestamp()
    )
    assert not running.agent.connected.is_set()
    assert not running.task.done()
    await running.stop()


# -- bootstrap tokens ----------------------------------------------------------------------------


async def test_only_operators_create_bootstrap_tokens(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _main_channel(pki, control_plane, "viewer", "dashboard") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await enrollment_pb2_grpc.EnrollmentServiceStub(channel).CreateBootstrapToken(
                enrollment_pb2.CreateBootstrapTokenRequest(node_pattern="gpu-node-*")
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    rows = await control_plane.store.run_core(lambda db: db.execute(select(BOOTSTRAP_TOKENS)).all())
    assert rows == []


async def test_bootstrap_token_is_stored_hashed_with_its_scope_and_default_lifetime(
    pki: Pki, control_plane: ControlPlane
) -> None:
    created = await _create_token(pki, control_plane, "gpu-node-*", uses=3)
    token_id, secret = created.token.split(".")
    assert created.token_id == token_id
    [row] = await control_plane.store.run_core(
        lambda db: db.execute(select(BOOTSTRAP_TOKENS)).all()
    )
    assert secret not in repr(tuple(row))
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (row.node_pattern, row.max_uses, row.uses) == ("gpu-node-*", 3, 0)
    assert row.created_by == f"spiffe://{TRUST_DOMAIN}/operator/admin"
    lifetime = created.expire_time.ToDatetime(dt.UTC) - row.created_at.replace(tzinfo=dt.UTC)
    assert abs(lifetime - dt.timedelta(minutes=30)) < dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("pattern", "uses", "ttl_s", "field"),
    [
        ("", 0, None, "node_pattern"),
        ("gpu node", 0, None, "node_pattern"),
        ("gpu-*", 100_000, None, "max_uses"),
        ("gpu-*", 0, -5.0, "ttl"),
        ("gpu-*", 0, 8 * 86400.0, "ttl"),
    ],
)
async def test_bootstrap_token_request_is_validated(
    pki: Pki, control_plane: ControlPlane, pattern: str, uses: int, ttl_s: float | None, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create_token(pki, control_plane, pattern, uses=uses, ttl_s=ttl_s)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"{field}:"), refused.value.details()


async def test_sentinelctl_token_create_prints_the_token_once(
    pki: Pki, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    pki.client("operator", "admin")  # the identity sentinelctl presents, made here
    # sentinelctl runs its own event loop; a thread keeps it off this test's.
    code = await asyncio.to_thread(
        ctl.main,
        [
            "--server",
            f"localhost:{control_plane.port}",
            "--certs-dir",
            str(pki.directory),
            "--identity",
            "operator-admin",
            "token",
            "create",
            "--node",
            "gpu-node-*",
            "--uses",
            "2",
            "--ttl",
            "10m",
        ],
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    token = out.strip()
    [row] = await control_plane.store.run_core(
        lambda db: db.execute(select(BOOTSTRAP_TOKENS)).all()
    )
    assert token.split(".")[0] == row.token_id
    assert row.max_uses == 2
    assert "shown only this once" in err
    await _enroll(pki, control_plane, token, "gpu-node-1")


def test_duration_flag_accepts_units() -> None:
    assert ctl._duration("30m") == duration_pb2.Duration(seconds=1800)
    assert ctl._duration("90") == duration_pb2.Duration(seconds=90)


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """`sentinel-agent`'s main configures the root logger; put pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logging")
def test_agent_without_certificate_or_token_exits_2(
    pki: Pki, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--node-id",
        "gpu-node-1",
        "--ca",
        str(pki.ca_path),
        "--cert",
        str(tmp_path / "agent.pem"),
        "--key",
        str(tmp_path / "agent.key"),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    assert agent_main.main(argv) == 2
    assert "no bootstrap token is configured" in capsys.readouterr().err
