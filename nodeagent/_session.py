"""The agent's session with the control plane: one stream at a time, opened with a hello and
reopened after every loss; it re-sends what the spool holds unacknowledged, then streams new
samples, GPU events and heartbeats, and hands received commands to the command runner.

Reconnects use capped exponential backoff with full jitter, the first retry included, so a
fleet whose control plane restarts does not come back in one thundering herd. A delay the
control plane asks for (GoAway's `reconnect_after`, the `retry-after-ms` trailer of a session
refused for capacity) replaces the backoff: it is waited in full, plus jitter. A session that
was open and ends because the server drained its connection (maximum connection age) is routine:
the agent reconnects at once, through the load balancer, and re-sends what was not acked.

An attempt that gets no welcome in time means a control plane too busy to answer (a reconnect
storm after its restart): retrying at once, with the same short wait, would only add to the
load and time out again. So the wait for the welcome doubles after every attempt that timed out
in a row, up to `connect_timeout_max_s`, and is back to `connect_timeout_s` after a welcome; and
the delay after a timeout is drawn from the upper half of a bound at least as long as the wait
that timed out (never an immediate retry). Each change of the wait is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import grpc
from sentinel.v1 import agent_pb2, agent_pb2_grpc

from nodeagent import encode
from nodeagent._certificates import CertificateKeeper
from nodeagent._certificates import _retry_after as retry_after
from nodeagent._state import AgentStateStore
from nodeagent._telemetry import TelemetrySampler
from nodeagent.actions import AGENT_VERSION, capabilities
from nodeagent.settings import AgentSettings
from processkit import Supervisor, log_context

log = logging.getLogger(__name__)


class SessionRefused(Exception):
    """The control plane answered the hello with something other than a welcome."""


class WelcomeTimeout(TimeoutError):
    """No welcome came within the wait: the control plane is down to a crawl, or overloaded."""


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)], attempt 0 included."""
    return rng.uniform(0.0, min(cap_s, base_s * (2**attempt)))


def timeout_backoff_delay(
    attempt: int, base_s: float, cap_s: float, waited_s: float, rng: random.Random
) -> float:
    """The delay after an attempt that got no welcome within `waited_s`: uniform in the upper
    half of [0, bound], where bound = min(cap, max(base * 2**attempt, waited_s)); so it is
    longer than after a plain failure, and never an immediate retry."""
    bound = min(cap_s, max(base_s * (2**attempt), waited_s))
    return rng.uniform(bound / 2, bound)


class WelcomeWait:
    """How long the next attempt waits for its welcome: `base_s`, doubled after every attempt
    that timed out in a row, up to `max_s`; back to `base_s` after a welcome."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max(base_s, max_s)
        self.seconds = base_s
        self.timeouts = 0
        """Attempts in a row that got no welcome in time."""

    def timed_out(self) -> bool:
        """Counts a timed-out attempt and lengthens the wait; True when the wait changed."""
        self.timeouts += 1
        previous, self.seconds = self.seconds, min(self.max_s, self.seconds * 2)
        return self.seconds != previous

    def welcomed(self) -> bool:
        """A welcome came: the wait is back to `base_s`; True when it changed."""
        self.timeouts = 0
        previous, self.seconds = self.seconds, self.base_s
        return self.seconds != previous


def requested_delay(asked_s: float, base_s: float, rng: random.Random) -> float:
    """A delay the control plane asked for, in full, plus jitter of up to the same again (at
    least up to `base_s`), so agents told the same delay do not all return in one instant."""
    return asked_s + rng.uniform(0.0, max(asked_s, base_s))


def mtls_credentials(settings: AgentSettings) -> grpc.ChannelCredentials:
    """The agent's TLS credentials, read from disk now (they are renewed in place)."""
    return grpc.ssl_channel_credentials(
        root_certificates=settings.ca.read_bytes(),
        private_key=settings.key.read_bytes(),
        certificate_chain=settings.cert.read_bytes(),
    )


def channel_options(settings: AgentSettings) -> list[tuple[str, int | str]]:
    """gRPC channel options for the settings: keepalive, reconnect pacing, TLS name."""
    options: list[tuple[str, int | str]] = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Our own backoff decides when to retry; keep gRPC's from stacking on top of it.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if settings.server_name_override:
        options.append(("grpc.ssl_target_name_override", settings.server_name_override))
    return options


class AgentSession:
    """Keeps the agent's one stream with the control plane open until the agent stops, and
    carries everything the agent sends and receives on it."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        certificates: CertificateKeeper,
        sampler: TelemetrySampler,
        on_command: Callable[[agent_pb2.Command], None],
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._certificates = certificates
        self._sampler = sampler
        self._on_command = on_command
        self._rng = rng
        self._stopping = asyncio.Event()
        self._heartbeat_s = settings.heartbeat_interval_s
        self._outgoing: asyncio.Queue[agent_pb2.ConnectRequest] | None = None
        self.connected = asyncio.Event()
        """Set while a session is open (welcomed)."""
        self.session_id = ""
        self.sessions_opened = 0
        self.acked_seq = 0
        """Highest telemetry seq the control plane acknowledged."""
        self._welcomed = False
        """Whether the current attempt got a welcome (the session was open)."""
        self._drained = False
        """Whether the server sent HTTP/2 GOAWAY on the current session's connection."""
        self.welcome_wait = WelcomeWait(settings.connect_timeout_s, settings.connect_timeout_max_s)
        self._last_write = 0.0
        """Event-loop time of the last message written on the open session."""

    def stop(self) -> None:
        """Ends the open session (half-closing the stream) and stops reconnecting."""
        self._stopping.set()

    def send(self, message: agent_pb2.ConnectRequest) -> bool:
        """Queues a message on the open session; False when there is none (it is dropped)."""
        if self._outgoing is None:
            return False
        self._outgoing.put_nowait(message)
        return True

    async def run(self, state: AgentStateStore, boot_count: int) -> None:
        """Connects, and reconnects after every loss, until `stop()`; never raises for a control
        plane that is down."""
        s = self._settings
        attempt = 0
        while not self._stopping.is_set():
            if not await self._certificate_ready():
                return
            delay: float | None = None
            self._welcomed = self._drained = False
            try:
                delay = await self._session(state, boot_count)
            except grpc.aio.AioRpcError as exc:
                delay = self._delay_after(exc)
            except WelcomeTimeout:
                delay = self._delay_after_timeout(attempt)
                attempt += 1
            except (SessionRefused, TimeoutError) as exc:
                log.warning("session failed: %s", exc or type(exc).__name__)
            except OSError as exc:
                log.error("cannot read TLS files: %s", exc)
            finally:
                self.connected.clear()
                self.session_id = ""
            if self._welcomed:
                # A session that was open resets the backoff, however it ended: a connection
                # drained after its maximum age, or a replica gone, is retried at once.
                attempt = 0
            if delay is None:
                delay = backoff_delay(attempt, s.backoff_base_s, s.backoff_cap_s, self._rng)
                attempt += 1
            if self._stopping.is_set():
                return
            log.info("reconnecting in %.2f s", delay, extra={"reconnect_delay_s": delay})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _delay_after_timeout(self, attempt: int) -> float:
        """Lengthens the wait for the next welcome (logged when it changes) and returns the
        delay before the next attempt."""
        wait = self.welcome_wait
        waited = wait.seconds
        s = self._settings
        delay = timeout_backoff_delay(attempt, s.backoff_base_s, s.backoff_cap_s, waited, self._rng)
        if wait.timed_out():
            log.warning(
                "no welcome within %g s (%d attempt(s) in a row): the control plane may be "
                "overloaded; waiting up to %g s for the next welcome, and longer between attempts",
                waited,
                wait.timeouts,
                wait.seconds,
                extra={"welcome_wait_s": wait.seconds},
            )
        else:
            log.debug("no welcome within %g s (%d attempts in a row)", waited, wait.timeouts)
        return delay

    def _delay_after(self, exc: grpc.aio.AioRpcError) -> float | None:
        """Logs why a session ended with an error status; returns the delay the control plane
        asked for (a refusal's `retry-after-ms`), None to use the backoff."""
        code = exc.code()
        asked = retry_after(exc)
        if asked is not None:
            delay = requested_delay(asked, self._settings.backoff_base_s, self._rng)
            log.warning(
                "session refused: %s: %s; retrying in %.2f s as asked",
                code.name,
                exc.details(),
                delay,
                extra={"status": code.name, "retry_after_s": asked},
            )
            return delay
        if code == grpc.StatusCode.UNAVAILABLE and self._welcomed and self._drained:
            # gRPC's maximum connection age: GOAWAY, the grace, then the stream is cut. The
            # spool still holds everything not acked, so nothing is lost by reconnecting.
            log.info("session ended: the control plane drained the connection (%s)", exc.details())
            return None
        level = (
            logging.ERROR
            if code
            in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            else logging.WARNING
        )
        log.log(level, "session ended: %s: %s", code.name, exc.details())
        return None

    async def _certificate_ready(self) -> bool:
        """Waits until there is a valid certificate to connect with; False when stopping."""
        if self._certificates.ready.is_set():
            return True
        ready = asyncio.ensure_future(self._certificates.ready.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        await asyncio.gather(ready, stopping, return_exceptions=True)
        return not self._stopping.is_set()

    async def _hello(self, state: AgentStateStore, boot_count: int) -> agent_pb2.ConnectRequest:
        next_seq = await asyncio.to_thread(state.next_seq)
        oldest, _count = await asyncio.to_thread(state.spool_bounds)
        last_command = await asyncio.to_thread(state.last_executed_command_id)
        sampler = self._sampler
        return agent_pb2.ConnectRequest(
            hello=agent_pb2.Hello(
                node_id=self._settings.node_id,
                agent_version=AGENT_VERSION,
                capabilities=capabilities(sampler.gpu_available),
                host=encode.host_inventory(
                    sampler.host_inventory, self._settings.kubernetes_node_name
                ),
                gpus=encode.gpu_inventory(sampler.gpu_inventory),
                resume=agent_pb2.ResumeState(
                    next_telemetry_seq=next_seq,
                    oldest_unacked_seq=oldest,
                    last_executed_command_id=last_command,
                    boot_count=boot_count,
                ),
            )
        )

    async def _session(self, state: AgentStateStore, boot_count: int) -> float | None:
        """One session; returns the delay the control plane asked for (None: the backoff's)."""
        s = self._settings
        hello = await self._hello(state, boot_count)
        # Read on every attempt, so a renewed certificate on disk is used at the next connect.
        async with self._certificates.files_lock:
            credentials = await asyncio.to_thread(mtls_credentials, s)
        channel = grpc.aio.secure_channel(s.control_plane, credentials, channel_options(s))
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        tasks = Supervisor("session")
        try:
            # At once: a silent new stream risks being dropped. A session refused before its
            # hello (capacity) may already be over; the read below raises its status.
            with contextlib.suppress(asyncio.InvalidStateError):
                await call.write(hello)
            # asyncio.timeout rather than wait_for: no extra task, and no reference cycle
            # through the raised error that kept a refused call (and its connection, on both
            # sides) alive until the garbage collector ran.
            try:
                async with asyncio.timeout(self.welcome_wait.seconds):
                    first = await call.read()
            except TimeoutError:
                raise WelcomeTimeout(f"no welcome within {self.welcome_wait.seconds:g} s") from None
            if first is grpc.aio.EOF:
                await call.wait_for_connection()
                raise SessionRefused(f"stream closed before welcome: {await call.details()}")
            if first.WhichOneof("message") != "welcome":
                raise SessionRefused(f"expected welcome, got {first.WhichOneof('message')}")
            welcome = first.welcome
            self._welcomed = True
            if self.welcome_wait.welcomed():
                log.info("welcomed: the wait for a welcome is back to %g s", s.connect_timeout_s)
            self.session_id = welcome.session_id
            self.sessions_opened += 1
            self._acknowledge(state, welcome.acked_telemetry_seq)
            if welcome.heartbeat_interval.ToNanoseconds() > 0:
                self._heartbeat_s = welcome.heartbeat_interval.ToNanoseconds() / 1e9
            self._sampler.interval.suggest(welcome.telemetry_interval.ToNanoseconds() / 1e9)
            max_batch = welcome.max_batch_samples or 100
            with log_context(session_id=welcome.session_id):
                log.info("session open; resending from seq %d", welcome.acked_telemetry_seq + 1)
                self.connected.set()
                outgoing: asyncio.Queue[agent_pb2.ConnectRequest] = asyncio.Queue()
                self._outgoing = outgoing
                tasks.start("writer", lambda: self._write_loop(call, outgoing), restart=False)
                tasks.start(
                    "telemetry",
                    lambda: self._pump_telemetry(
                        state, outgoing, welcome.acked_telemetry_seq, max_batch
                    ),
                    restart=False,
                )
                tasks.start("heartbeat", lambda: self._heartbeat_loop(outgoing), restart=False)
                tasks.start("drain-watch", lambda: self._watch_drain(channel), restart=False)
                return await self._read_loop(state, call)
        finally:
            self._outgoing = None
            await tasks.stop()
            call.cancel()
            await channel.close()

    async def _watch_drain(self, channel: grpc.aio.Channel) -> None:
        """Notes when the server sends HTTP/2 GOAWAY on this session's connection: the channel
        leaves READY while the stream goes on until the server's grace ends."""
        if channel.get_state() != grpc.ChannelConnectivity.READY:
            return
        await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        self._drained = True
        log.info("the control plane is draining this connection (GOAWAY); the session goes on")

    async def _read_loop(self, state: AgentStateStore, call: Any) -> float | None:
        """Reads until the stream ends or the agent stops (then half-closes it and returns 0)."""
        reader = asyncio.ensure_future(self._read_messages(state, call))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                return reader.result()
            reader.cancel()
            # The stream may have ended under us (the server went away at the same moment);
            # half-closing it then fails, and there is nothing left to close.
            with contextlib.suppress(Exception):
                await call.done_writing()
            return 0.0
        finally:
            stopping.cancel()
            reader.cancel()
            await asyncio.gather(reader, stopping, return_exceptions=True)

    async def _read_messages(self, state: AgentStateStore, call: Any) -> float | None:
        """Handles what the control plane sends; returns the delay it asked for at its end
        (None: the backoff's)."""
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                code = await call.code()
                log.warning(
                    "control plane ended the session: %s %s", code.name, await call.details()
                )
                return None
            kind = message.WhichOneof("message")
            if kind == "telemetry_ack":
                self._acknowledge(state, message.telemetry_ack.seq)
            elif kind == "command":
                self._on_command(message.command)
            elif kind == "config_update":
                self._sampler.interval.update(
                    message.config_update.telemetry_interval.ToNanoseconds() / 1e9
                )
            elif kind == "go_away":
                asked: float = message.go_away.reconnect_after.ToNanoseconds() / 1e9
                log.info(
                    "control plane going away (%s); asked to reconnect after %.2f s",
                    message.go_away.reason,
                    asked,
                    extra={"reconnect_after_s": asked},
                )
                return requested_delay(asked, self._settings.backoff_base_s, self._rng)
            elif kind == "cancel_command":
                log.info("cancel requested for %s", message.cancel_command.command_id)

    def _acknowledge(self, state: AgentStateStore, seq: int) -> None:
        # Noted in memory; the spool deletes them with its next write (no disk I/O here).
        if seq > self.acked_seq:
            state.note_acknowledged(seq)
            self.acked_seq = seq

    async def _write_loop(
        self, call: Any, outgoing: asyncio.Queue[agent_pb2.ConnectRequest]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await outgoing.get()
            try:
                await call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream ended under us; the reader sees why and the session is retried.
                # Whatever was queued is re-sent from the spool or re-delivered by the server.
                return
            self._last_write = loop.time()

    async def _pump_telemetry(
        self,
        state: AgentStateStore,
        outgoing: asyncio.Queue[agent_pb2.ConnectRequest],
        acked: int,
        max_batch: int,
    ) -> None:
        """Sends everything in the spool after `acked`, then each new sample as it comes."""
        sampler = self._sampler
        sent_up_to = acked
        while True:
            sampler.new_sample.clear()
            latest = sampler.latest_spooled
            rows: list[tuple[int, bytes]]
            if latest is not None and latest[0] <= sent_up_to:
                rows = []  # nothing spooled since the last send
            elif latest is not None and latest[0] == sent_up_to + 1:
                rows = [latest]  # caught up: the sample just spooled, without reading it back
            else:
                rows = await asyncio.to_thread(state.unsent, sent_up_to, max_batch)
            if rows:
                batch = agent_pb2.TelemetryBatch(dropped_samples=state.take_dropped())
                for seq, payload in rows:
                    batch.samples.add().ParseFromString(payload)
                    sent_up_to = seq
                outgoing.put_nowait(agent_pb2.ConnectRequest(telemetry=batch))
            while sampler.events:
                outgoing.put_nowait(encode.event_request(sampler.events.popleft()))
            if len(rows) < max_batch:
                await sampler.new_sample.wait()

    async def _heartbeat_loop(self, outgoing: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        """A heartbeat after every heartbeat interval in which nothing else was sent: any
        message proves the agent alive, so telemetry at least that often makes them moot."""
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()
        while True:
            await asyncio.sleep(self._last_write + self._heartbeat_s - loop.time())
            if loop.time() - self._last_write >= self._heartbeat_s:
                self._last_write = loop.time()  # queued: the next one is due one interval on
                outgoing.put_nowait(
                    agent_pb2.ConnectRequest(
                        heartbeat=agent_pb2.Heartbeat(send_time=encode.now_timestamp())
                    )
                )
