"""The one server interceptor: maps the peer certificate to a principal, enforces the role
table, and counts every call (method, status code, latency) for Prometheus.

grpc.aio interceptors do not see the call's context, so the check runs inside a wrapper around
the method's behaviour, which does; the principal is handed to the handler in a contextvar.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from certs import IdentityError, certificate_serial_hex, parse_spiffe_id
from controlplane.api._errors import abort
from controlplane.auth._principal import Principal, reset_principal, set_principal
from controlplane.auth.roles import allowed
from controlplane.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)


def _status_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(code)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, trust_domain: str, metrics: ControlPlaneMetrics) -> None:
        self._trust_domain = trust_domain
        self._metrics = metrics
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
        self, method: str, context: grpc.aio.ServicerContext, *, timed: bool
    ) -> AsyncIterator[None]:
        """Authorizes the call, exposes its principal, and counts it however it ends."""
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
        except Exception:
            code = "UNKNOWN"
            log.exception("unhandled error in %s", method)
            raise
        finally:
            self._metrics.grpc_requests.labels(method, code or _status_name(context)).inc()
            if timed:
                self._metrics.grpc_latency.labels(method).observe(time.perf_counter() - started)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(behavior)
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, context, timed=True):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        # Streaming handlers either yield responses or write them through the context.
        if inspect.isasyncgenfunction(behavior):

            @functools.wraps(behavior)
            async def generator(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with self._call(method, context, timed=False):
                    async for response in behavior(request, context):
                        yield response

            return generator

        @functools.wraps(behavior)
        async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, context, timed=False):
                return await behavior(request, context)

        return coroutine
