"""The one server interceptor: maps the peer certificate (or, when the call carries one, the
bearer token of a logged-in user) to a principal, refuses revoked certificates, enforces the role
table, counts every call (method, status code, latency) for Prometheus, writes mutating and
refused calls to the audit log, and keeps the registry of open streaming calls, so a revocation
or a deleted user ends them at once (UNAUTHENTICATED, saying why).

grpc.aio interceptors do not see the call's context, so the check runs inside a wrapper around
the method's behaviour, which does; the principal is handed to the handler in a contextvar.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError, Message

from certs import Identity, IdentityError, parse_spiffe_id
from controlplane.api._errors import abort
from controlplane.audit import AuditLog
from controlplane.auth import Principal, reset_principal, set_principal
from controlplane.auth.roles import AGENT, MUTATING_METHODS, allowed
from controlplane.identity import Logins, OpenStream, OpenStreams, Revocations, TokenInvalid
from controlplane.metrics import ControlPlaneMetrics
from controlplane.store import database_unavailable

log = logging.getLogger(__name__)

# What an audited call acts on: the first of these fields set on the request, or on its nested
# `plan` / `policy` message, named "<kind>/<value>"; else the request's idempotency key.
_TARGET_FIELDS = (("plan_id", "plan"), ("policy_id", "policy"), ("node_id", "node"))
_TARGET_HOLDERS = ("plan", "policy")
_DRY_RUN_FIELD = "validate_only"
_REFUSALS = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})
_MAX_DETAIL_BYTES = 1024
_AUTHORIZATION = "authorization"
USER_PREFIX = "user:"
# protobuf's parser refuses messages nested deeper than this (upb's default); a Struct spends
# three levels per nested object (Struct, its map entry, Value).
MAX_NESTING = 100
MAX_STRUCT_NESTING = 30
# Agent sessions are not cut through the stream registry: revocation closes them through the
# fleet (`close_revoked_sessions`), which ends them in order (reader, writer, directory entry).
_SESSION_METHODS = frozenset({"/sentinel.v1.AgentService/Connect"})


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


class Undecodable:
    """What a request that protobuf cannot parse becomes (too deeply nested, or malformed), so
    the call ends INVALID_ARGUMENT instead of gRPC's UNKNOWN for a failed deserializer."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = (
            f"request: cannot be parsed ({problem}); messages may nest at most "
            f"{MAX_NESTING} levels (a Struct about {MAX_STRUCT_NESTING})"
        )


def _parsing(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(str(exc).rpartition(": ")[2] or "malformed")

    return parse


class _Reply:
    """The response of a unary call, for the audit record made when the call ends."""

    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: object = None


def audit_target(request: object) -> str:
    """The resource a request (or a response) names, e.g. "plan/<id>"; '' when it names none
    (or is a stream)."""
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


@dataclass(frozen=True, slots=True)
class _CertificateFacts:
    serial: str
    not_before: dt.datetime


@dataclass(frozen=True, slots=True)
class _Caller:
    """An authorized caller: its principal, and what a revocation or a user deletion matches
    an open stream of its on."""

    principal: Principal
    certificate_node: str | None
    login: str | None

    def open_stream(self, method: str, task: asyncio.Task[Any] | None) -> OpenStream:
        def end() -> None:
            if task is not None:
                task.cancel()

        return OpenStream(
            method=method,
            certificate_serial=self.principal.serial,
            certificate_node=self.certificate_node,
            certificate_not_before=self.principal.not_before,
            username=self.principal.name if self.login is not None else None,
            login=self.login,
            end=end,
        )


def _certificate_facts(pem: bytes) -> _CertificateFacts:
    certificate = x509.load_pem_x509_certificate(pem)
    return _CertificateFacts(
        format(certificate.serial_number, "x"), certificate.not_valid_before_utc
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call, enforces the role table, counts it, and audits it."""

    def __init__(
        self,
        trust_domain: str,
        metrics: ControlPlaneMetrics,
        audit: AuditLog,
        *,
        revocations: Revocations,
        logins: Logins,
        streams: OpenStreams | None = None,
    ) -> None:
        self._trust_domain = trust_domain
        self._metrics = metrics
        self._audit = audit
        self._revocations = revocations
        self._logins = logins
        self.streams = streams if streams is not None else OpenStreams()
        """The open streaming calls, for the revocation and user-deletion paths to cut."""
        self._certificates: dict[bytes, _CertificateFacts] = {}

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
                _parsing(handler.request_deserializer),
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                _parsing(handler.request_deserializer),
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                _parsing(handler.request_deserializer),
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            _parsing(handler.request_deserializer),
            handler.response_serializer,
        )

    def _certificate(self, pem: bytes) -> _CertificateFacts:
        """Serial and notBefore of a peer certificate, parsed once per certificate."""
        facts = self._certificates.get(pem)
        if facts is None:
            if len(self._certificates) > 10_000:
                self._certificates.clear()
            facts = _certificate_facts(pem)
            self._certificates[pem] = facts
        return facts

    @staticmethod
    def _claimed_identity(context: grpc.aio.ServicerContext) -> str:
        """Who the peer says it is, even when that is refused (for the audit log)."""
        ids = context.auth_context().get("peer_spiffe_id") or []
        if len(ids) == 1:
            return str(ids[0].decode(errors="replace"))
        return f"unidentified peer {context.peer()}"

    @staticmethod
    def _bearer_token(context: grpc.aio.ServicerContext) -> str | None:
        """The token of `authorization: Bearer <token>` metadata; None when there is none."""
        values = [
            value
            for key, value in context.invocation_metadata() or ()
            if key.lower() == _AUTHORIZATION
        ]
        if not values:
            return None
        scheme, _, token = str(values[0]).strip().partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
            # Never fall back to the certificate's role when the caller meant to use a token.
            return ""
        return token.strip()

    async def _user_principal(
        self, token: str, certificate: _CertificateFacts, context: grpc.aio.ServicerContext
    ) -> tuple[Principal, str]:
        """The principal of a bearer token, and the login the token belongs to."""
        if not token:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization metadata: expected one 'Bearer <access token>'",
            )
        try:
            found = await self._logins.authenticate(token)
        except TokenInvalid as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"bearer token refused: {exc}")
        user = found.user
        principal = Principal(
            f"{USER_PREFIX}{user.username}",
            user.role,
            user.username,
            certificate.serial,
            certificate.not_before,
        )
        return principal, found.login

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext) -> _Caller:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        if len(pems) != 1:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        certificate = self._certificate(pems[0])
        ids = auth.get("peer_spiffe_id") or []
        spiffe_id = ids[0].decode(errors="replace") if len(ids) == 1 else ""
        identity: Identity | None = None
        identity_problem = (
            "the client certificate carries no single SPIFFE id "
            f"(expected spiffe://{self._trust_domain}/<role>/<name> as its URI SAN)"
        )
        if spiffe_id:
            try:
                identity = parse_spiffe_id(spiffe_id, self._trust_domain)
            except IdentityError as exc:
                identity_problem = f"client identity refused: {exc}"
        node_id = identity.name if identity is not None and identity.role == AGENT else None
        revocation = self._revocations.is_revoked(
            certificate.serial, node_id, certificate.not_before
        )
        if revocation is not None:
            log.warning("refused %s: %s", method, revocation.describe())
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"client certificate refused: {revocation.describe()}",
            )
        token = self._bearer_token(context)
        login: str | None = None
        if token is not None:
            principal, login = await self._user_principal(token, certificate, context)
        elif identity is None:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, identity_problem)
        else:
            principal = Principal(
                spiffe_id,
                identity.role,
                identity.name,
                certificate.serial,
                certificate.not_before,
            )
        if not allowed(method, principal.role):
            log.warning("refused %s for %s", method, principal.spiffe_id)
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {principal.role!r} ({principal.spiffe_id}) may not call {method}",
            )
        return _Caller(principal, node_id, login)

    @contextlib.asynccontextmanager
    async def _call(
        self, method: str, request: object, context: grpc.aio.ServicerContext, *, streaming: bool
    ) -> AsyncIterator[_Reply]:
        """Authorizes the call, exposes its principal, keeps an open stream in the registry,
        and counts and audits the call however it ends."""
        started = time.perf_counter()
        code: str | None = None
        principal: Principal | None = None
        open_stream: OpenStream | None = None
        reply = _Reply()
        try:
            caller = await self._authorize(method, context)
            principal = caller.principal
            if isinstance(request, Undecodable):
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            if streaming and method not in _SESSION_METHODS:
                open_stream = self.streams.add(caller.open_stream(method, asyncio.current_task()))
            token = set_principal(principal)
            try:
                yield reply
            finally:
                reset_principal(token)
                if open_stream is not None:
                    self.streams.discard(open_stream)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if open_stream is not None and open_stream.reason and task is not None:
                # Our own cancellation (the stream was cut), not the client's nor the server's:
                # the call ends with the reason instead of CANCELLED.
                task.uncancel()
                code = "UNAUTHENTICATED"
                await abort(context, grpc.StatusCode.UNAUTHENTICATED, open_stream.reason)
            code = "CANCELLED"
            raise
        except Exception as exc:
            if database_unavailable(exc):
                # A database restarting or cut off: the caller should retry, and must not see
                # SQL or parameters. (A write whose commit was cut may have landed: SubmitPlan is
                # idempotent by request_id, so retrying it is safe.)
                code = "UNAVAILABLE"
                log.warning("%s: the database is unavailable: %s", method, exc.__class__.__name__)
                await abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    "the database is unavailable (restarting or unreachable); retry shortly",
                )
            if _peer_gone(exc, context):
                # Answering a client that already went away (a status, a refusal): there is
                # no one to tell, and nothing went wrong here.
                code = "CANCELLED"
                log.debug("%s: the client went away before the answer: %r", method, exc)
                raise
            code = "UNKNOWN"
            log.exception("unhandled error in %s", method)
            raise
        finally:
            outcome = code or _status_name(context)
            self._metrics.grpc_requests.labels(method, outcome).inc()
            if not streaming:
                self._metrics.grpc_latency.labels(method).observe(time.perf_counter() - started)
            if method in MUTATING_METHODS or outcome in _REFUSALS:
                who = principal.spiffe_id if principal else self._claimed_identity(context)
                await self._record(method, request, reply.response, context, outcome, who)

    async def _record(
        self,
        method: str,
        request: object,
        response: object,
        context: grpc.aio.ServicerContext,
        outcome: str,
        who: str,
    ) -> None:
        # The call's own outcome stands whatever happens here: an audit failure is logged (and
        # counted by the audit log, which keeps the event queued) but never reaches the caller.
        try:
            await self._audit.record(
                principal=who,
                method=method,
                target=audit_target(response) or audit_target(request),
                outcome=outcome,
                detail=audit_detail(request, outcome, context.details()),
            )
        except Exception:
            log.exception("could not write the audit event of %s (%s)", method, outcome)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(behavior)
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, request, context, streaming=False) as reply:
                # The response names what the call created (SubmitPlan's new plan id).
                reply.response = await behavior(request, context)
                return reply.response

        return unary

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        # Streaming handlers either yield responses or write them through the context.
        if inspect.isasyncgenfunction(behavior):

            @functools.wraps(behavior)
            async def generator(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with self._call(method, request, context, streaming=True):
                    async for response in behavior(request, context):
                        yield response

            return generator

        @functools.wraps(behavior)
        async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, request, context, streaming=True):
                return await behavior(request, context)

        return coroutine


def _peer_gone(exc: Exception, context: grpc.aio.ServicerContext) -> bool:
    """Whether `exc` is gRPC failing to send to a client that has already gone: the call is
    cancelled, or the batch that carries the status failed (grpc's ExecuteBatchError, not part
    of its public API, hence the name)."""
    return context.cancelled() or type(exc).__name__ == "ExecuteBatchError"
