"""`AgentService`: the transport of agent sessions. It admits a session while this replica is
under its agent capacity, checks the hello against the caller's certificate, then pumps
messages between the stream and the fleet/telemetry domain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2
from sentinel.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

from certs import IdentityError, validate_name
from controlplane._fds import SessionRoom, effective_session_limit
from controlplane.api import _convert
from controlplane.api._enrollment_service import issuance_status
from controlplane.api._errors import abort
from controlplane.api._interceptor import Undecodable
from controlplane.auth import current_principal
from controlplane.enrollment import CertificateIssuer
from controlplane.fleet import (
    AgentRegistry,
    AgentSession,
    CommandLedger,
    CommandOut,
    ConfigOut,
    GoAwayOut,
    Outbound,
    TelemetryAckOut,
    UnknownCommand,
)
from controlplane.metrics import ControlPlaneMetrics
from controlplane.settings import ControlPlaneSettings
from controlplane.telemetry import Sample, TelemetryHub
from processkit import log_context

log = logging.getLogger(__name__)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def outbound_message(message: Outbound) -> agent_pb2.ConnectResponse:
    if isinstance(message, TelemetryAckOut):
        return agent_pb2.ConnectResponse(telemetry_ack=agent_pb2.TelemetryAck(seq=message.seq))
    if isinstance(message, CommandOut):
        return agent_pb2.ConnectResponse(
            command=agent_pb2.Command(
                command_id=message.command_id,
                plan_id=message.plan_id,
                action=message.action,
                parameters=_convert.struct(message.parameters),
                deadline=_convert.timestamp(message.deadline),
            )
        )
    if isinstance(message, ConfigOut):
        return agent_pb2.ConnectResponse(
            config_update=agent_pb2.ConfigUpdate(
                telemetry_interval=_duration(message.telemetry_interval_s)
            )
        )
    return agent_pb2.ConnectResponse(
        go_away=agent_pb2.GoAway(
            reason=message.reason, reconnect_after=_duration(message.reconnect_after_s)
        )
    )


HELLO_BEFORE_REFUSAL_S = 1.0
"""How long a refusal (capacity, admission) waits for the agent's hello first."""


async def _let_hello_arrive(context: grpc.aio.ServicerContext) -> None:
    """Reads (and drops) the agent's hello before a refusal, waiting at most a second. A status
    sent while the client's first write is still in flight reaches it as INTERNAL "Internal
    error from Core" (gRPC core replaces the status when that write fails), so the agent would
    lose the retry-after and fall back to its short backoff: the feedback loop admission
    control is there to prevent. A client that sends nothing is refused after the wait."""
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await asyncio.wait_for(context.read(), HELLO_BEFORE_REFUSAL_S)


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    """The agent session endpoint: one bidi stream per node (hello, telemetry, commands) and
    certificate renewal."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        registry: AgentRegistry,
        hub: TelemetryHub[telemetry_pb2.TelemetrySample],
        ledger: CommandLedger,
        metrics: ControlPlaneMetrics,
        issuer: CertificateIssuer | None = None,
        session_room: SessionRoom | None = None,
    ) -> None:
        self._settings = settings
        self._session_room = session_room
        self.session_limit, self._limit_reason = effective_session_limit(
            settings.max_agents, session_room
        )
        """Sessions this replica holds at most (None: no limit): `max_agents`, or less when the
        open-files limit leaves room for fewer (`_limit_reason` is then "fd_limit")."""
        self._issuer = issuer
        self._registry = registry
        self._hub = hub
        self._ledger = ledger
        self._metrics = metrics
        self._handlers: set[asyncio.Task[object]] = set()
        self._admitted = 0
        """Connect calls past the capacity check and not yet finished (hello pending included)."""
        self._opening = 0
        """Connect calls admitted and not yet open (welcomed, unfinished commands re-sent)."""
        self._rng = random.Random()  # noqa: S311 (jitter, not cryptography)

    async def wait_sessions_closed(self, timeout_s: float) -> None:
        """Waits until every session handler has finished its cleanup (after the server has
        cancelled them on stop), so their last writes reach the store before it closes."""
        pending = {t for t in self._handlers if not t.done()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            if still:
                log.warning("%d session(s) still closing at shutdown", len(still))

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        level: int = logging.WARNING,
    ) -> NoReturn:
        self._metrics.sessions_refused.labels(reason).inc()
        log.log(level, "agent session refused: %s", message)
        await abort(context, code, message)

    async def _read_hello(self, context: grpc.aio.ServicerContext) -> agent_pb2.Hello:
        principal = current_principal()
        try:
            first = await asyncio.wait_for(context.read(), self._settings.hello_timeout_s)
        except TimeoutError:
            await self._refuse(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "hello_timeout",
                f"no hello within {self._settings.hello_timeout_s:g} s of opening the session",
            )
        if isinstance(first, Undecodable):
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "bad_hello", first.problem
            )
        if first is grpc.aio.EOF:
            # The client went away before its hello (gave up waiting, in a storm): nothing to
            # warn an operator about, one of thousands then.
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "no_hello",
                "the client closed the stream before its hello",
                logging.DEBUG,
            )
        if first.WhichOneof("message") != "hello":
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "no_hello",
                "the first message of a session must be `hello`",
            )
        hello: agent_pb2.Hello = first.hello
        try:
            validate_name(hello.node_id)
        except IdentityError as exc:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "bad_hello", f"hello.node_id: {exc}"
            )
        if len(hello.agent_version) > 64 or "\x00" in hello.agent_version:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_hello",
                "hello.agent_version: at most 64 characters, no NUL",
            )
        if hello.node_id != principal.name:
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "foreign_node",
                f"hello.node_id {hello.node_id!r} does not match the certificate's identity "
                f"{principal.spiffe_id}: an agent may only speak for its own node",
            )
        if hello.resume.oldest_unacked_seq > hello.resume.next_telemetry_seq:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_hello",
                "hello.resume.oldest_unacked_seq is greater than hello.resume.next_telemetry_seq",
            )
        return hello

    def _over_capacity(self) -> bool:
        """Whether a new session would exceed `max_agents` or the open-files room. A node that
        already holds a session here is let in: its new session replaces the old one rather
        than adding to the count."""
        limit = self.session_limit
        if limit is None or self._admitted < limit:
            return False
        return self._registry.session_for(current_principal().name) is None

    async def _refuse_for_capacity(self, context: grpc.aio.ServicerContext) -> NoReturn:
        # Drawn per refusal, so refused agents do not all come back in the same instant; the
        # trailer is the convention of every other retryable refusal (Login, Enroll).
        base = self._settings.capacity_retry_after_s
        retry_ms = max(1, math.ceil(self._rng.uniform(base, 2 * base) * 1000))
        retry = f"retry in {retry_ms / 1000:.1f} s (another replica may have room)"
        self._metrics.sessions_refused.labels(self._limit_reason).inc()
        room = self._session_room
        if self._limit_reason == "fd_limit" and room is not None:
            message = (
                f"this control plane is at its open-files limit: {self.session_limit} agent "
                f"sessions fit in its {room.limit.soft} descriptors ({room.open_at_start} open "
                f"at start, {room.reserve} kept in reserve): {retry}; its operator can raise "
                "the limit (`ulimit -n`, LimitNOFILE) or add replicas"
            )
        else:
            message = (
                f"this control plane holds its maximum of {self.session_limit} agent "
                f"sessions: {retry}"
            )
        log.info("agent session refused: %s", message)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            message,
            trailing_metadata=(("retry-after-ms", str(retry_ms)),),
        )
        raise AssertionError("unreachable: context.abort raises")

    async def Connect(  # type: ignore[override]
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        # Checked and counted before the first await, so concurrent connects cannot all slip
        # in under the limit; before the hello, so a full replica spends nothing on it.
        if self._over_capacity():
            await _let_hello_arrive(context)
            await self._refuse_for_capacity(context)
        limit = self._settings.max_opening_sessions
        if limit > 0 and self._opening >= limit:
            await _let_hello_arrive(context)
            await self._refuse_for_admission(context)
        self._admitted += 1
        self._opening += 1
        opening = True

        def opened() -> None:
            nonlocal opening
            if opening:
                opening = False
                self._opening -= 1

        try:
            await self._connect(context, opened)
        finally:
            opened()
            self._admitted -= 1

    async def _refuse_for_admission(self, context: grpc.aio.ServicerContext) -> NoReturn:
        base = self._settings.admission_retry_after_s
        retry_ms = max(1, math.ceil(self._rng.uniform(base, 3 * base) * 1000))
        self._metrics.sessions_refused.labels("admission").inc()
        log.debug("agent session refused: %d sessions are being opened", self._opening)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{self._opening} agent sessions are being opened (a reconnect storm?): "
            f"retry in {retry_ms / 1000:.1f} s",
            trailing_metadata=(("retry-after-ms", str(retry_ms)),),
        )
        raise AssertionError("unreachable: context.abort raises")

    async def _connect(self, context: grpc.aio.ServicerContext, opened: Callable[[], None]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        hello = await self._read_hello(context)
        principal = current_principal()
        session, state = await self._registry.open_session(
            _convert.hello_info(hello, principal.spiffe_id)
        )
        # Revoking the certificate or the node finds and closes the session by these.
        session.certificate_serial = principal.serial
        session.certificate_not_before = principal.not_before
        writer: asyncio.Task[None] | None = None
        reason = "stream ended"
        with log_context(node_id=hello.node_id, session_id=session.session_id):
            # Everything after open_session is inside the try: a client that goes away at any
            # point (even while the welcome is being written) must not leave the session open.
            try:
                self._hub.start_session(
                    hello.node_id, state.last_telemetry_seq, state.telemetry_gap_samples
                )
                self._metrics.sessions_opened.inc()
                log.info("agent session opened (version %s)", hello.agent_version or "unknown")
                await context.write(
                    agent_pb2.ConnectResponse(
                        welcome=agent_pb2.Welcome(
                            session_id=session.session_id,
                            telemetry_interval=_duration(self._settings.telemetry_interval_s),
                            heartbeat_interval=_duration(self._settings.heartbeat_interval_s),
                            acked_telemetry_seq=state.last_telemetry_seq,
                            max_batch_samples=self._settings.max_batch_samples,
                        )
                    )
                )
                writer = asyncio.create_task(self._write_loop(session, context))
                await self._ledger.redeliver(session)
                opened()
                reason = await self._read_loop(session, context)
            except asyncio.CancelledError:
                reason = "cancelled (client went away or server stopping)"
                raise
            finally:
                # close_session changes the registry before its first await, so even a second
                # cancellation arriving during this cleanup cannot leave the session registered.
                await self._registry.close_session(session, reason)
                if writer is not None:
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
                log.info("agent session closed: %s", session.close_reason or reason)
            if session.revoked:
                await abort(context, grpc.StatusCode.UNAUTHENTICATED, session.close_reason)

    async def _write_loop(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await session.next_outbound()
            if message is None:
                return
            try:
                await context.write(outbound_message(message))
            except Exception as exc:
                # The reader sees the end of the stream too and closes the session; commands
                # not acknowledged are re-sent on the next session.
                log.info("stream closed while writing: %s", exc)
                session.close(f"write failed: {exc}")
                return
            if isinstance(message, GoAwayOut):
                return

    async def _read_loop(self, session: AgentSession, context: grpc.aio.ServicerContext) -> str:
        """Reads until the agent closes the stream or the session is closed from our side.

        The per-message path is a plain `await context.read()` in the call's own task; a close
        from our side (superseded, liveness, shutdown, revocation) cancels that task, and the
        cancellation is taken back here. No second task per session: thousands of sessions
        would each hold one.
        """
        node_id = session.node_id
        task = asyncio.current_task()
        assert task is not None
        closing = False

        def stop_reading() -> None:
            nonlocal closing
            if not closing:
                closing = True
                task.cancel()

        session.on_close = stop_reading
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return "agent closed the stream"
                if isinstance(request, Undecodable):
                    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.problem)
                self._registry.heard_from(node_id)
                await self._dispatch(session, request, context)
        except asyncio.CancelledError:
            # Ours alone (not also the client's going away or the server stopping): the
            # session ends with its reason once the writer has had a moment to flush a GoAway.
            if not closing or task.cancelling() > 1:
                raise
            task.uncancel()
            session.on_close = None
            await asyncio.sleep(0.05)
            return session.close_reason
        finally:
            session.on_close = None

    async def _dispatch(
        self,
        session: AgentSession,
        request: agent_pb2.ConnectRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        node_id = session.node_id
        kind = request.WhichOneof("message")
        if kind == "telemetry":
            batch = request.telemetry
            if len(batch.samples) > self._settings.max_batch_samples:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"telemetry.samples: {len(batch.samples)} samples in one batch, "
                    f"at most {self._settings.max_batch_samples}",
                )
            samples = []
            for sample in batch.samples:
                if sample.node_id and sample.node_id != node_id:
                    await abort(
                        context,
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"telemetry.samples[].node_id {sample.node_id!r}: "
                        "an agent may only send its own node's telemetry",
                    )
                if not sample.node_id:
                    sample.node_id = node_id
                samples.append(Sample(node_id, sample.seq, sample))
            samples.sort(key=lambda s: s.seq)
            outcome = self._hub.accept(node_id, samples)
            self._metrics.telemetry_received.inc(len(samples))
            if outcome.duplicates:
                self._metrics.telemetry_duplicates.inc(outcome.duplicates)
            if outcome.gaps:
                self._metrics.telemetry_gaps.inc(outcome.gaps)
            if batch.dropped_samples:
                log.warning("agent dropped %d sample(s): its spool was full", batch.dropped_samples)
        elif kind == "command_ack":
            await self._safely(self._ledger.record_ack(node_id, request.command_ack.command_id))
        elif kind == "command_result":
            result = _convert.command_result(node_id, "", request.command_result)
            await self._safely(self._ledger.record_result(node_id, result))
        elif kind == "event":
            event = request.event
            kind_name = agent_pb2.AgentEventKind.Name(event.kind).removeprefix("AGENT_EVENT_KIND_")
            self._metrics.agent_events.labels(kind_name).inc()
            log.warning(
                "agent event %s: %s",
                kind_name,
                event.message,
                extra={"gpu_uuid": event.gpu_uuid, "xid": event.xid},
            )
        elif kind == "hello":
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, "hello may only be the first message"
            )
        # heartbeats only prove liveness, which reading them already recorded

    @staticmethod
    async def _safely(work: Awaitable[None]) -> None:
        try:
            await work
        except UnknownCommand as exc:
            log.warning("%s", exc)

    async def RenewCertificate(
        self, request: agent_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewCertificateResponse:
        if self._issuer is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "certificate renewal is not configured on this control plane",
            )
        node_id = current_principal().name
        try:
            issued = await self._issuer.renew(node_id, request.csr_pem.encode())
        except Exception as exc:
            status = issuance_status(exc)
            if status is None:
                raise
            log.warning("certificate renewal refused for node %s: %s", node_id, status[1])
            await abort(context, *status)
        return agent_pb2.RenewCertificateResponse(
            certificate_pem=issued.certificate_pem.decode(),
            ca_bundle_pem=issued.ca_bundle_pem.decode(),
            expire_time=_convert.timestamp(issued.not_after),
        )

    @staticmethod
    def go_away_all(
        registry: AgentRegistry,
        reason: str,
        reconnect_after_s: float,
        *,
        spread_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        """Tells every agent to go and come back after a delay drawn uniformly from
        [reconnect_after_s, reconnect_after_s + spread_s], then closes its session: spread, so
        the agents of a stopping replica do not all land on the survivors at once."""
        draw = rng or random.Random()  # noqa: S311 (jitter, not cryptography)
        for session in registry.sessions():
            jitter = draw.uniform(0.0, spread_s) if spread_s > 0 else 0.0
            session.send(GoAwayOut(reason, reconnect_after_s + jitter))
            session.close(reason)
