"""The load simulator: a process that plays a share of the fleet's agents, each with its own
client certificate, its own gRPC channel (one TCP+TLS connection) and one `AgentService/Connect`
session speaking the real protocol. It is driven by the measured server process over a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

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
        self._rng = random.Random(config.first_index)
        self._last_welcome = 0.0

    async def run(self) -> None:
        config = self._config
        ca_pem = (pathlib.Path(config.cert_dir) / "ca.pem").read_bytes()
        self._agents = [
            SimulatedAgent(index, config, ca_pem, self._stats)
            for index in range(config.first_index, config.first_index + config.count)
        ]
        await self._connect_all()
        await self._serve_requests()

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
        }

    async def _serve_requests(self) -> None:
        while True:
            request = await receive(self._conn)
            if request["type"] == "count":
                self._conn.send({"type": "count", **self._snapshot()})
            elif request["type"] == "stop":
                snapshot = self._snapshot()
                # Close in slices: thousands of simultaneous closes would be one CPU spike on
                # the server, and there is nothing to learn from it.
                for start in range(0, len(self._agents), 500):
                    await asyncio.gather(*(a.close() for a in self._agents[start : start + 500]))
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
