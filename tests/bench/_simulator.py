"""The load simulator: a process that plays a share of the fleet's agents, each with its own
client certificate, its own gRPC channel (one TCP+TLS connection) and one `AgentService/Connect`
session speaking the real protocol. It is driven by the measured server process over a pipe.

With `SimulatorConfig.reconnect` (the storm benchmark, tests/bench/storm.py) each agent instead
behaves like the real agent after a loss: it keeps producing telemetry into an in-memory spool,
reconnects (honouring a refusal's `retry-after-ms`, else full-jitter backoff), resumes its seq
numbering in the hello and re-sends whatever the control plane has not stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import pathlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
from sentinel.v1 import agent_pb2

from tests.bench import _messages
from tests.bench._ipc import Message, receive

CONNECT_METHOD = "/sentinel.v1.AgentService/Connect"


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """What one simulator process plays and how."""

    target: str
    """host:port of the server under test."""
    cert_dir: str
    """Holds ca.pem and <node>.pem / <node>.key for every agent."""
    first_index: int
    """Index (1-based) of this process's first agent."""
    count: int
    """How many agents this process plays."""
    interval_s: float
    """Telemetry interval of every agent."""
    ramp: int
    """Connection attempts (TLS handshake + hello + welcome) in flight at once."""
    attempt_timeout_s: float = 30.0
    """How long one attempt may take to get its Welcome before it is retried."""
    connect_timeout_s: float = 600.0
    """How long the whole fleet may take to connect before the simulator reports what it has."""
    keepalive_s: float = 30.0
    """Client keepalive ping interval, as a real agent's."""
    reconnect: bool = False
    """Play agents that survive a lost session (ReconnectingAgent): reconnect, resume the
    telemetry seq, re-send what is not stored. Off: a lost session is counted, not repaired."""
    backoff_base_s: float = 0.5
    """Reconnect backoff (full jitter: uniform in [0, min(cap, base * 2**attempt)])."""
    backoff_cap_s: float = 10.0
    attempt_timeout_max_s: float = 60.0
    """Reconnecting agents: after attempts in a row that got no Welcome, the wait doubles up
    to this, and the delay before the next attempt is drawn from the upper half of a bound at
    least that wait (nodeagent/_session.py's WelcomeWait and timeout_backoff_delay)."""


def channel_options(index: int, keepalive_s: float) -> list[tuple[str, int]]:
    keepalive_ms = int(keepalive_s * 1000)
    return [
        # Every agent is a separate machine: never let two channels share a subchannel
        # (connection), whatever their arguments have in common.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # The benchmark retries attempts itself, counting them; gRPC's own retries would hide them.
        ("grpc.enable_retries", 0),
        ("sentinel.bench.agent_index", index),
    ]


@dataclass(slots=True)
class FleetStats:
    """What the simulator counts; reported to the server process on request."""

    sent: int = 0
    welcomed: int = 0
    attempts: int = 0
    failed_attempts: int = 0
    commands_answered: int = 0
    streams_lost: int = 0
    errors: list[str] = field(default_factory=list)
    # Only with SimulatorConfig.reconnect:
    connected: int = 0
    """Agents in an open (welcomed) session now."""
    all_connected_at: float | None = None
    """When `connected` last reached the number of agents (CLOCK_MONOTONIC)."""
    sessions_opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Failed attempts by how they failed ("UNAVAILABLE retry-after", "timed out", ...)."""
    resent: int = 0
    """Samples sent again because the control plane had not stored them."""

    def error(self, text: str) -> None:
        # Keep a few distinct examples: the first failures say what went wrong, the rest repeat.
        if len(self.errors) < 10 and text not in self.errors:
            self.errors.append(text)


class SimulatedAgent:
    """One node agent: its channel, its session, its telemetry clock."""

    def __init__(
        self, index: int, config: SimulatorConfig, ca_pem: bytes, stats: FleetStats
    ) -> None:
        self.index = index
        self.node_id = _messages.node_id(index)
        self._config = config
        self._stats = stats
        directory = pathlib.Path(config.cert_dir)
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=(directory / f"{self.node_id}.key").read_bytes(),
            certificate_chain=(directory / f"{self.node_id}.pem").read_bytes(),
        )
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        # Telemetry and command answers share one stream; gRPC allows one write at a time.
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.connect_latency_s = 0.0

    async def connect(self) -> bool:
        """One attempt: open the channel and session, send the hello at once, await Welcome."""
        self._stats.attempts += 1
        started = time.monotonic()
        channel = grpc.aio.secure_channel(
            self._config.target,
            self._credentials,
            options=channel_options(self.index, self._config.keepalive_s),
        )
        connect = channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=agent_pb2.ConnectRequest.SerializeToString,
            response_deserializer=agent_pb2.ConnectResponse.FromString,
        )
        call = connect()
        try:
            async with asyncio.timeout(self._config.attempt_timeout_s):
                # A session that stays silent after opening can be cancelled before it reaches
                # the handler (DESIGN.md): the hello goes out before anything is awaited.
                await call.write(_messages.hello(self.index))
                first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
                raise RuntimeError(f"expected a Welcome, got {first!r}")
        except (TimeoutError, grpc.aio.AioRpcError, RuntimeError) as exc:
            self._stats.failed_attempts += 1
            self._stats.error(f"connect: {_describe(exc)}")
            call.cancel()
            await channel.close()
            return False
        self.connect_latency_s = time.monotonic() - started
        self._channel, self._call = channel, call
        return True

    def start_session(self, telemetry_offset_s: float) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._telemetry_loop(telemetry_offset_s)),
        ]

    async def _write(self, message: agent_pb2.ConnectRequest) -> None:
        assert self._call is not None
        async with self._write_lock:
            await self._call.write(message)

    async def _read_loop(self) -> None:
        assert self._call is not None
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise RuntimeError("server ended the stream")
                kind = response.WhichOneof("message")
                if kind == "command":
                    await self._answer(response.command)
                elif kind == "go_away":
                    raise RuntimeError(f"server sent GoAway: {response.go_away.reason}")
                # Telemetry acks and config updates need no answer from a simulated agent.
        except (grpc.aio.AioRpcError, RuntimeError) as exc:
            self._lost(exc)

    async def _answer(self, command: agent_pb2.Command) -> None:
        await self._write(
            agent_pb2.ConnectRequest(
                command_ack=agent_pb2.CommandAck(command_id=command.command_id)
            )
        )
        result = agent_pb2.CommandResult(command_id=command.command_id)
        result.start_time.GetCurrentTime()
        if command.action == "ping":
            result.outcome = agent_pb2.COMMAND_OUTCOME_SUCCEEDED
            result.output.CopyFrom(_messages.ping_output(self.node_id, command.command_id))
        else:
            result.outcome = agent_pb2.COMMAND_OUTCOME_UNSUPPORTED
            result.message = f"the simulated agent does not know {command.action!r}"
        result.finish_time.GetCurrentTime()
        await self._write(agent_pb2.ConnectRequest(command_result=result))
        self._stats.commands_answered += 1

    async def _telemetry_loop(self, offset_s: float) -> None:
        loop = asyncio.get_running_loop()
        source = _messages.TelemetrySource(self.index, self._config.interval_s)
        # A fixed schedule (not sleep-after-send) keeps the rate exact when a write is slow.
        due = loop.time() + offset_s
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._write(source.next())
                self._stats.sent += 1
                due += self._config.interval_s
        except (grpc.aio.AioRpcError, RuntimeError, grpc.aio.UsageError) as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stats.streams_lost += 1
        self._stats.error(f"session: {_describe(exc)}")
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()


def _pass_through(message: agent_pb2.ConnectRequest | bytes) -> bytes:
    """Request serializer that sends already-serialized telemetry as it is."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The delay a refusal asks for (trailing metadata `retry-after-ms`), as the agent reads it."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


class ReconnectingAgent:
    """One node agent that survives losing its session, as nodeagent/_session.py does.

    Its telemetry clock runs whether or not a session is open: each sample gets the next seq and
    goes, serialized, into an in-memory spool until the control plane acknowledges it (a
    `TelemetryAck`, or the `Welcome`'s `acked_telemetry_seq` on the next session). After a loss
    it waits (a refusal's `retry-after-ms` plus jitter of up to the same again, a GoAway's
    `reconnect_after` likewise, else full-jitter exponential backoff, reset by every session
    that was welcomed), says in its hello which seq comes next and which is the oldest unacked,
    and re-sends the spool after the welcome's watermark before anything new.
    """

    def __init__(
        self,
        index: int,
        config: SimulatorConfig,
        ca_pem: bytes,
        stats: FleetStats,
        rng: random.Random,
    ) -> None:
        self.index = index
        self.node_id = _messages.node_id(index)
        self._config = config
        self._stats = stats
        self._rng = rng
        self._welcome_wait_s = config.attempt_timeout_s
        """How long the next attempt waits for its Welcome (doubles after a timeout)."""
        directory = pathlib.Path(config.cert_dir)
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=(directory / f"{self.node_id}.key").read_bytes(),
            certificate_chain=(directory / f"{self.node_id}.pem").read_bytes(),
        )
        self._hello = _messages.hello(index)
        self._spool: collections.deque[tuple[int, bytes]] = collections.deque()
        self.produced = 0
        """The seq of the last sample produced (0: none yet)."""
        self._sent_up_to = 0
        """Highest seq written on the current session."""
        self._max_sent = 0
        """Highest seq ever written (anything at or below it that is written again is a re-send)."""
        self._new_sample = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.sessions = 0
        self.in_session = False
        self.stopping = False
        self.connect_latency_s = 0.0
        """First attempt to first welcome."""

    def start(
        self, ramp: asyncio.Semaphore, on_first_welcome: Callable[[ReconnectingAgent], None]
    ) -> None:
        self._tasks.append(asyncio.create_task(self._run(ramp, on_first_welcome)))

    def start_telemetry(self, offset_s: float) -> None:
        self._tasks.append(asyncio.create_task(self._produce(offset_s)))

    async def close(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- telemetry ----------------------------------------------------------------------------

    async def _produce(self, offset_s: float) -> None:
        loop = asyncio.get_running_loop()
        source = _messages.TelemetrySource(self.index, self._config.interval_s)
        due = loop.time() + offset_s
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            message = source.next()
            self.produced = message.telemetry.samples[0].seq
            # Serialized now (the source mutates its one message in place); sent as it is.
            self._spool.append((self.produced, message.SerializeToString()))
            self._new_sample.set()
            due += self._config.interval_s

    def _acknowledge(self, seq: int) -> None:
        spool = self._spool
        while spool and spool[0][0] <= seq:
            spool.popleft()

    async def _send_loop(self, call: Any) -> None:
        """Writes every spooled sample after `_sent_up_to`, in seq order, for as long as the
        session lasts; a failed write ends it quietly (the reader sees the stream end)."""
        stats = self._stats
        try:
            while True:
                self._new_sample.clear()
                for seq, payload in list(self._spool):
                    if seq <= self._sent_up_to:
                        continue
                    async with self._write_lock:
                        await call.write(payload)
                    self._sent_up_to = seq
                    stats.sent += 1
                    if seq <= self._max_sent:
                        stats.resent += 1
                    else:
                        self._max_sent = seq
                await self._new_sample.wait()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return

    # -- sessions -----------------------------------------------------------------------------

    async def _run(
        self, ramp: asyncio.Semaphore, on_first_welcome: Callable[[ReconnectingAgent], None]
    ) -> None:
        """Connects, and reconnects after every loss, until close(). The fleet's first
        connection goes through `ramp`; reconnects are paced only by their delays."""
        config = self._config
        attempt = 0
        first_attempt = time.monotonic()
        while not self.stopping:
            delay: float | None = None
            welcomed = False
            try:
                delay = await self._session(
                    ramp if self.sessions == 0 else None, first_attempt, on_first_welcome
                )
            except grpc.aio.AioRpcError as exc:
                asked = retry_after_s(exc)
                if asked is not None:
                    delay = self._requested(asked)
                    self._failed(f"{exc.code().name} + retry-after", exc)
                else:
                    self._failed(exc.code().name, exc)
            except TimeoutError as exc:
                self._failed("no welcome in time", exc)
                if not self.in_session:
                    # As the agent: a longer delay than after a plain failure, at least half
                    # the wait that timed out, and a longer wait next time.
                    waited = self._welcome_wait_s
                    bound = min(
                        config.backoff_cap_s, max(config.backoff_base_s * 2**attempt, waited)
                    )
                    delay = self._rng.uniform(bound / 2, bound)
                    attempt += 1
                    self._welcome_wait_s = min(config.attempt_timeout_max_s, waited * 2)
            except (RuntimeError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                self._failed("other", exc)
            finally:
                welcomed = self.in_session
                self._end_session()
            if welcomed:
                # A session that was open resets the backoff and the wait, however it ended.
                attempt = 0
                self._welcome_wait_s = config.attempt_timeout_s
            if self.stopping:
                return
            if delay is None:
                ceiling = min(config.backoff_cap_s, config.backoff_base_s * 2**attempt)
                delay = self._rng.uniform(0.0, ceiling)
                attempt += 1
            await asyncio.sleep(delay)

    def _requested(self, asked_s: float) -> float:
        """A delay the control plane asked for, in full, plus jitter of up to the same again
        (at least up to the backoff base), as nodeagent/_session.py's `requested_delay`."""
        return asked_s + self._rng.uniform(0.0, max(asked_s, self._config.backoff_base_s))

    def _failed(self, kind: str, exc: BaseException) -> None:
        stats = self._stats
        if self.in_session:
            # An open session that ended: lost (and counted so), not a failed attempt.
            stats.error(f"session: {_describe(exc)}")
            return
        stats.failed_attempts += 1
        stats.failures[kind] = stats.failures.get(kind, 0) + 1
        stats.error(f"connect: {_describe(exc)}")

    def _end_session(self) -> None:
        if self.in_session:
            self.in_session = False
            self._stats.connected -= 1
            if not self.stopping:
                self._stats.streams_lost += 1

    async def _session(
        self,
        gate: asyncio.Semaphore | None,
        first_attempt: float,
        on_first_welcome: Callable[[ReconnectingAgent], None],
    ) -> float | None:
        """One attempt and, once welcomed, the session until it ends; raises why it failed or
        ended, or returns the delay a GoAway asked for (None: the backoff's)."""
        stats = self._stats
        stats.attempts += 1
        channel = grpc.aio.secure_channel(
            self._config.target,
            self._credentials,
            options=channel_options(self.index, self._config.keepalive_s),
        )
        call = channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=_pass_through,
            response_deserializer=agent_pb2.ConnectResponse.FromString,
        )()
        sender: asyncio.Task[None] | None = None
        try:
            async with gate if gate is not None else contextlib.nullcontext():
                resume = self._hello.hello.resume
                resume.next_telemetry_seq = self.produced + 1
                resume.oldest_unacked_seq = self._spool[0][0] if self._spool else 0
                async with asyncio.timeout(self._welcome_wait_s):
                    # At once, before anything is awaited. A refused session may already be
                    # over; the read below raises its status.
                    with contextlib.suppress(asyncio.InvalidStateError):
                        await call.write(self._hello)
                    first = await call.read()
            if first is grpc.aio.EOF:
                raise RuntimeError(f"stream closed before the welcome: {await call.details()}")
            if first.WhichOneof("message") != "welcome":
                raise RuntimeError(f"expected a Welcome, got {first.WhichOneof('message')}")
            acked = first.welcome.acked_telemetry_seq
            self._acknowledge(acked)
            self._sent_up_to = acked
            self.in_session = True
            self.sessions += 1
            stats.sessions_opened += 1
            stats.connected += 1
            if stats.connected == self._config.count:
                stats.all_connected_at = time.monotonic()
            if self.sessions == 1:
                self.connect_latency_s = time.monotonic() - first_attempt
                on_first_welcome(self)
            sender = asyncio.create_task(self._send_loop(call))
            return await self._read_loop(call)
        finally:
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            call.cancel()
            await channel.close()

    async def _read_loop(self, call: Any) -> float | None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                self._stats.error(f"session: server ended the stream: {await call.details()}")
                return None
            kind = response.WhichOneof("message")
            if kind == "telemetry_ack":
                self._acknowledge(response.telemetry_ack.seq)
            elif kind == "command":
                await self._answer(call, response.command)
            elif kind == "go_away":
                asked: float = response.go_away.reconnect_after.ToNanoseconds() / 1e9
                return self._requested(asked)

    async def _answer(self, call: Any, command: agent_pb2.Command) -> None:
        async with self._write_lock:
            await call.write(
                agent_pb2.ConnectRequest(
                    command_ack=agent_pb2.CommandAck(command_id=command.command_id)
                )
            )
        result = agent_pb2.CommandResult(command_id=command.command_id)
        result.start_time.GetCurrentTime()
        if command.action == "ping":
            result.outcome = agent_pb2.COMMAND_OUTCOME_SUCCEEDED
            result.output.CopyFrom(_messages.ping_output(self.node_id, command.command_id))
        else:
            result.outcome = agent_pb2.COMMAND_OUTCOME_UNSUPPORTED
            result.message = f"the simulated agent does not know {command.action!r}"
        result.finish_time.GetCurrentTime()
        async with self._write_lock:
            await call.write(agent_pb2.ConnectRequest(command_result=result))
        self._stats.commands_answered += 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc)


class Simulator:
    def __init__(self, config: SimulatorConfig, conn: Connection) -> None:
        self._config = config
        self._conn = conn
        self._stats = FleetStats()
        self._agents: list[SimulatedAgent] = []
        self._reconnecting: list[ReconnectingAgent] = []
        self._rng = random.Random(config.first_index)
        self._last_welcome = 0.0

    async def run(self) -> None:
        config = self._config
        ca_pem = (pathlib.Path(config.cert_dir) / "ca.pem").read_bytes()
        indices = range(config.first_index, config.first_index + config.count)
        if config.reconnect:
            self._reconnecting = [
                ReconnectingAgent(index, config, ca_pem, self._stats, self._rng)
                for index in indices
            ]
            await self._start_reconnecting()
        else:
            self._agents = [SimulatedAgent(index, config, ca_pem, self._stats) for index in indices]
            await self._connect_all()
        await self._serve_requests()

    async def _start_reconnecting(self) -> None:
        """Starts every reconnecting agent (first connections paced by the ramp) and reports,
        as `_connect_all` does, once all are welcomed; they go on by themselves after that."""
        config = self._config
        ramp = asyncio.Semaphore(config.ramp)
        first_attempt = time.monotonic()
        all_welcomed = asyncio.Event()

        def welcomed(agent: ReconnectingAgent) -> None:
            self._stats.welcomed += 1
            self._last_welcome = time.monotonic()
            agent.start_telemetry(self._rng.uniform(0, config.interval_s))
            if self._stats.welcomed == config.count:
                all_welcomed.set()

        for agent in self._reconnecting:
            agent.start(ramp, welcomed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_welcomed.wait(), config.connect_timeout_s)
        latencies = [a.connect_latency_s for a in self._reconnecting if a.connect_latency_s > 0]
        self._conn.send(
            {
                "type": "connected",
                "first_attempt": first_attempt,
                "all_welcome": self._last_welcome if all_welcomed.is_set() else None,
                "welcomed": self._stats.welcomed,
                "agents": config.count,
                "attempts": self._stats.attempts,
                "failed_attempts": self._stats.failed_attempts,
                "connect_latencies_s": latencies,
                "errors": list(self._stats.errors),
            }
        )

    async def _connect_all(self) -> None:
        config = self._config
        in_flight = asyncio.Semaphore(config.ramp)
        first_attempt = time.monotonic()

        async def bring_up(agent: SimulatedAgent) -> None:
            backoff = 0.5
            while True:
                async with in_flight:
                    connected = await agent.connect()
                if connected:
                    break
                # Full jitter, as a real agent's reconnect: failed attempts must not retry in step.
                await asyncio.sleep(self._rng.uniform(0, backoff))
                backoff = min(backoff * 2, 10.0)
            self._stats.welcomed += 1
            self._last_welcome = time.monotonic()
            # Agents start their clocks at random moments, so load is spread over the interval.
            agent.start_session(self._rng.uniform(0, config.interval_s))

        tasks = [asyncio.create_task(bring_up(agent)) for agent in self._agents]
        _, pending = await asyncio.wait(tasks, timeout=config.connect_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        latencies = [a.connect_latency_s for a in self._agents if a.connect_latency_s > 0]
        self._conn.send(
            {
                "type": "connected",
                "first_attempt": first_attempt,
                "all_welcome": self._last_welcome if not pending else None,
                "welcomed": self._stats.welcomed,
                "agents": config.count,
                "attempts": self._stats.attempts,
                "failed_attempts": self._stats.failed_attempts,
                "connect_latencies_s": latencies,
                "errors": list(self._stats.errors),
            }
        )

    def _snapshot(self) -> Message:
        stats = self._stats
        return {
            "sent": stats.sent,
            "at": time.monotonic(),
            "cpu_s": time.process_time(),
            "open_streams": stats.welcomed - stats.streams_lost,
            "streams_lost": stats.streams_lost,
            "commands_answered": stats.commands_answered,
            "errors": list(stats.errors),
            "connected": stats.connected,
            "all_connected_at": stats.all_connected_at,
            "attempts": stats.attempts,
            "failed_attempts": stats.failed_attempts,
            "failures": dict(stats.failures),
            "sessions_opened": stats.sessions_opened,
            "resent": stats.resent,
        }

    async def _serve_requests(self) -> None:
        while True:
            request = await receive(self._conn)
            if request["type"] == "count":
                self._conn.send({"type": "count", **self._snapshot()})
            elif request["type"] == "seqs":
                # Each agent's last produced telemetry seq, by node (reconnect mode).
                self._conn.send(
                    {
                        "type": "seqs",
                        "at": time.monotonic(),
                        "produced": {a.node_id: a.produced for a in self._reconnecting},
                    }
                )
            elif request["type"] == "stop":
                snapshot = self._snapshot()
                # Close in slices: thousands of simultaneous closes would be one CPU spike on
                # the server, and there is nothing to learn from it.
                agents: list[SimulatedAgent] | list[ReconnectingAgent] = (
                    self._reconnecting or self._agents
                )
                for start in range(0, len(agents), 500):
                    await asyncio.gather(*(a.close() for a in agents[start : start + 500]))
                self._conn.send({"type": "stopped", **snapshot})
                return


def simulator_process_main(config: SimulatorConfig, conn: Connection) -> None:
    """Entry point of a simulator process (multiprocessing, spawn)."""
    logging.basicConfig(level=logging.WARNING, format="simulator: %(levelname)s %(message)s")
    try:
        asyncio.run(Simulator(config, conn).run())
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise
