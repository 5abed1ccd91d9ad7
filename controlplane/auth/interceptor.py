"""The one server interceptor: maps the peer certificate to a principal, enforces the role
table, counts every call (method, status code, latency) for Prometheus, and writes mutating and
refused calls to the audit log.

grpc.aio interceptors do not see the call's context, so the check runs inside a wrapper around
the method's behaviour, which does; the principal is handed to the handler in a contextvar.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from certs import IdentityError, certificate_serial_hex, parse_spiffe_id
from controlplane.api._errors import abort
from controlplane.audit import AuditLog
from controlplane.auth._principal import Principal, reset_principal, set_principal
from controlplane.auth.roles import MUTATING_METHODS, allowed
from controlplane.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)

# What an audited call acts on: the first of these fields set on the request, or on its nested
# `plan` / `policy` message, named "<kind>/<value>"; else the request's idempotency key.
_TARGET_FIELDS = (("plan_id", "plan"), ("policy_id", "policy"), ("node_id", "node"))
_TARGET_HOLDERS = ("plan", "policy")
_DRY_RUN_FIELD = "validate_only"
_REFUSALS = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})
_MAX_DETAIL_BYTES = 1024


def _status_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(code)


def _string_field(message: Message, name: str) -> str:
    if name not in message.DESCRIPTOR.fields_by_name:
        return ""
    value = getattr(message, name)
    return value if isinstance(value, str) else ""


def audit_target(request: object) -> str:
    """The resource a request names, e.g. "plan/<id>"; '' when it names none (or is a stream)."""
    if not isinstance(request, Message):
        return ""
    holders = [request]
    for name in _TARGET_HOLDERS:
        if name in request.DESCRIPTOR.fields_by_name and request.HasField(name):
            holders.append(getattr(request, name))
    for holder in holders:
        for field, kind in _TARGET_FIELDS:
            value = _string_field(holder, field)
            if value:
                return f"{kind}/{value}"
    request_id = _string_field(request, "request_id")
    return f"request/{request_id}" if request_id else ""


def audit_detail(request: object, outcome: str, details: str | None) -> str:
    """The status message of a failed call (at most 1 KiB), and whether it was a dry run."""
    parts = []
    if (
        isinstance(request, Message)
        and _DRY_RUN_FIELD in request.DESCRIPTOR.fields_by_name
        and getattr(request, _DRY_RUN_FIELD) is True
    ):
        parts.append(_DRY_RUN_FIELD)
    if outcome != "OK" and details:
        parts.append(details.encode()[:_MAX_DETAIL_BYTES].decode(errors="ignore"))
    return ": ".join(parts)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, trust_domain: str, metrics: ControlPlaneMetrics, audit: AuditLog) -> None:
        self._trust_domain = trust_domain
        self._metrics = metrics
        self._audit = audit
        self._serials: dict[bytes, str] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _serial(self, pem: bytes) -> str:
        serial = self._serials.get(pem)
        if serial is None:
            if len(self._serials) > 10_000:
                self._serials.clear()
            serial = certificate_serial_hex(pem)
            self._serials[pem] = serial
        return serial

    @staticmethod
    def _claimed_identity(context: grpc.aio.ServicerContext) -> str:
        """Who the peer says it is, even when that is refused (for the audit log)."""
        ids = context.auth_context().get("peer_spiffe_id") or []
        if len(ids) == 1:
            return str(ids[0].decode(errors="replace"))
        return f"unidentified peer {context.peer()}"

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        auth = context.auth_context()
        ids = auth.get("peer_spiffe_id") or []
        if len(ids) != 1:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate carries no single SPIFFE id "
                f"(expected spiffe://{self._trust_domain}/<role>/<name> as its URI SAN)",
            )
        spiffe_id = ids[0].decode()
        try:
            identity = parse_spiffe_id(spiffe_id, self._trust_domain)
        except IdentityError as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"client identity refused: {exc}")
        pems = auth.get("x509_pem_cert") or [b""]
        principal = Principal(spiffe_id, identity.role, identity.name, self._serial(pems[0]))
        if not allowed(method, identity.role):
            log.warning("refused %s for %s", method, spiffe_id)
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {identity.role!r} ({spiffe_id}) may not call {method}",
            )
        return principal

    @contextlib.asynccontextmanager
    async def _call(
        self, method: str, request: object, context: grpc.aio.ServicerContext, *, timed: bool
    ) -> AsyncIterator[None]:
        """Authorizes the call, exposes its principal, and counts and audits it however it
        ends."""
        started = time.perf_counter()
        code: str | None = None
        try:
            token = set_principal(await self._authorize(method, context))
            try:
                yield
            finally:
                reset_principal(token)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"
            log.exception("unhandled error in %s", method)
            raise
        finally:
            outcome = code or _status_name(context)
            self._metrics.grpc_requests.labels(method, outcome).inc()
            if timed:
                self._metrics.grpc_latency.labels(method).observe(time.perf_counter() - started)
            if method in MUTATING_METHODS or outcome in _REFUSALS:
                await self._record(method, request, context, outcome)

    async def _record(
        self, method: str, request: object, context: grpc.aio.ServicerContext, outcome: str
    ) -> None:
        # The call's own outcome stands whatever happens here: an audit failure is logged (and
        # counted by the audit log, which keeps the event queued) but never reaches the caller.
        try:
            await self._audit.record(
                principal=self._claimed_identity(context),
                method=method,
                target=audit_target(request),
                outcome=outcome,
                detail=audit_detail(request, outcome, context.details()),
            )
        except Exception:
            log.exception("could not write the audit event of %s (%s)", method, outcome)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(behavior)
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, request, context, timed=True):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        # Streaming handlers either yield responses or write them through the context.
        if inspect.isasyncgenfunction(behavior):

            @functools.wraps(behavior)
            async def generator(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with self._call(method, request, context, timed=False):
                    async for response in behavior(request, context):
                        yield response

            return generator

        @functools.wraps(behavior)
        async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, request, context, timed=False):
                return await behavior(request, context)

        return coroutine
