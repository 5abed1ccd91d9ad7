"""`EnrollmentService` in its two places: Enroll alone on the enrollment port (TLS without a
client certificate, rate-limited per peer address, every outcome audited), and
CreateBootstrapToken on the main port for operators."""

from __future__ import annotations

import datetime as dt
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from sentinel.v1 import enrollment_pb2, enrollment_pb2_grpc

from certs import CsrError, CsrIdentityMismatch
from controlplane.api import _convert
from controlplane.api._errors import abort
from controlplane.audit import AuditLog
from controlplane.auth import RateLimiter, current_principal
from controlplane.enrollment import (
    BootstrapTokens,
    CaUnavailable,
    CertificateIssuer,
    NodeIdInvalid,
    TokenRefused,
    TokenRequestInvalid,
)
from controlplane.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)

ENROLL_METHOD = "/sentinel.v1.EnrollmentService/Enroll"
# What the enrollment port serves: Enroll, and health so a load balancer can probe it.
ENROLLMENT_PORT_METHODS = frozenset(
    {ENROLL_METHOD, "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)


def issuance_status(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a refusal of the certificate issuer; None when `exc`
    is not one (a bug, left to surface)."""
    if isinstance(exc, CaUnavailable):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, NodeIdInvalid):
        return grpc.StatusCode.INVALID_ARGUMENT, f"node_id: {exc}"
    if isinstance(exc, CsrIdentityMismatch):
        return grpc.StatusCode.PERMISSION_DENIED, f"csr_pem: {exc}"
    if isinstance(exc, CsrError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"csr_pem: {exc}"
    if isinstance(exc, TokenRefused):
        if exc.reason == "wrong_scope":
            return grpc.StatusCode.PERMISSION_DENIED, f"token: {exc}"
        return grpc.StatusCode.UNAUTHENTICATED, f"token: {exc}"
    return None


def peer_address(peer: str) -> str:
    """The caller's address without its port: `ipv4:10.0.0.7:51234` -> `10.0.0.7`,
    `ipv6:%5B::1%5D:51234` -> `::1` (gRPC percent-encodes the brackets of IPv6 peers)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = urllib.parse.unquote(rest).rpartition(":")
        return host.strip("[]") or rest
    return peer


class EnrollmentPortService(enrollment_pb2_grpc.EnrollmentServiceServicer):
    """Enroll, served on the enrollment port only."""

    def __init__(
        self,
        issuer: CertificateIssuer,
        limiter: RateLimiter,
        audit: AuditLog,
        metrics: ControlPlaneMetrics,
    ) -> None:
        self._issuer = issuer
        self._limiter = limiter
        self._audit = audit
        self._metrics = metrics

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        address = peer_address(context.peer())
        wait_s = self._limiter.acquire(address)
        if wait_s > 0:
            # Not audited: a flood would otherwise flood the audit log too.
            retry_ms = max(1, math.ceil(wait_s * 1000))
            self._metrics.grpc_requests.labels(ENROLL_METHOD, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many enrollment attempts from {address}: retry in {retry_ms / 1000:.1f} s",
                trailing_metadata=(("retry-after-ms", str(retry_ms)),),
            )
        target = f"node/{request.node_id}" if request.node_id else ""
        try:
            issued = await self._issuer.enroll(
                request.token, request.node_id, request.csr_pem.encode()
            )
        except Exception as exc:
            status = issuance_status(exc)
            if status is None:
                raise
            code, message = status
            log.warning("enrollment refused for %s: %s", address, message)
            await self._finish(address, target, code.name, message)
            await abort(context, code, message)
        await self._finish(address, target, "OK", f"certificate {issued.serial_hex}")
        return enrollment_pb2.EnrollResponse(
            certificate_pem=issued.certificate_pem.decode(),
            ca_bundle_pem=issued.ca_bundle_pem.decode(),
            expire_time=_convert.timestamp(issued.not_after),
        )

    async def CreateBootstrapToken(
        self,
        request: enrollment_pb2.CreateBootstrapTokenRequest,
        context: grpc.aio.ServicerContext,
    ) -> enrollment_pb2.CreateBootstrapTokenResponse:
        # The port's interceptor refuses this before it gets here; kept as a second wall.
        await abort(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            "CreateBootstrapToken is served on the main port, to operators only",
        )

    async def _finish(self, address: str, target: str, outcome: str, detail: str) -> None:
        self._metrics.grpc_requests.labels(ENROLL_METHOD, outcome).inc()
        try:
            await self._audit.record(f"peer {address}", ENROLL_METHOD, target, outcome, detail)
        except Exception:
            log.exception("could not write the audit event of an enrollment (%s)", outcome)


class EnrollmentPortInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every method but Enroll (and health) on the enrollment port: callers there
    carry no certificate, so nothing else may be reachable from it."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        if method in ENROLLMENT_PORT_METHODS:
            return await continuation(handler_call_details)

        async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is not served on the enrollment port, which serves only "
                f"{ENROLL_METHOD}; use the main port with a client certificate",
            )

        # Stream-stream, so the refusal never waits for a request message.
        return grpc.stream_stream_rpc_method_handler(refuse)


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServiceServicer):
    """CreateBootstrapToken on the main port (operators only, per the role table)."""

    def __init__(self, tokens: BootstrapTokens, default_ttl_s: float) -> None:
        self._tokens = tokens
        self._default_ttl = dt.timedelta(seconds=default_ttl_s)

    async def CreateBootstrapToken(
        self,
        request: enrollment_pb2.CreateBootstrapTokenRequest,
        context: grpc.aio.ServicerContext,
    ) -> enrollment_pb2.CreateBootstrapTokenResponse:
        try:
            ttl = (
                dt.timedelta(microseconds=request.ttl.ToMicroseconds())
                if request.HasField("ttl")
                else self._default_ttl
            )
        except OverflowError:  # found by tests/api_fuzz: beyond what a timedelta holds
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ttl: {request.ttl.seconds} s is out of range",
            )
        try:
            created = await self._tokens.create(
                request.node_pattern,
                # Unset (0) means single-use.
                max_uses=request.max_uses or 1,
                ttl=ttl,
                created_by=current_principal().spiffe_id,
            )
        except TokenRequestInvalid as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info(
            "bootstrap token %s created for nodes %r (%d use(s), expires %s)",
            created.token_id,
            request.node_pattern,
            request.max_uses or 1,
            created.expires_at.isoformat(),
        )
        return enrollment_pb2.CreateBootstrapTokenResponse(
            token=created.token,
            token_id=created.token_id,
            expire_time=_convert.timestamp(created.expires_at),
        )

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        # The role table already refuses Enroll here; this answers should that ever change.
        await abort(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            "Enroll is served on the enrollment port (setting enrollment_listen), not here",
        )
