"""The node agent: collects telemetry into its spool, holds one session with the control plane,
re-sends what was not acknowledged after every reconnect, and carries out commands in order,
each at most once.

Reconnects use capped exponential backoff with full jitter, the first retry included, so a
fleet whose control plane restarts does not come back in one thundering herd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import platform
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sentinel.v1 import agent_pb2, agent_pb2_grpc, fleet_pb2, telemetry_pb2

from nodeagent._certificates import CertificateKeeper
from nodeagent._state import AgentStateStore
from nodeagent.actions import ACTIONS, AGENT_VERSION, ActionError, AgentControls, capabilities
from nodeagent.collectors import AsyncGpuCollector, HostCollector
from nodeagent.settings import AgentSettings
from processkit import Supervisor, log_context

log = logging.getLogger(__name__)

_OUTCOMES = {
    name.removeprefix("COMMAND_OUTCOME_"): value for name, value in agent_pb2.CommandOutcome.items()
}
_INTERVAL_SETTING = "telemetry_interval_ms"


class SessionRefused(Exception):
    """The control plane answered the hello with something other than a welcome."""


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)], attempt 0 included."""
    return rng.uniform(0.0, min(cap_s, base_s * (2**attempt)))


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class NodeAgent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        host_collector: HostCollector | None = None,
        gpu_collector: AsyncGpuCollector | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._host = host_collector
        self._gpu = gpu_collector
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not cryptography)
        self._state: AgentStateStore | None = None
        self._supervisor = Supervisor("agent")
        self._stopping = asyncio.Event()
        self._new_sample = asyncio.Event()
        self._interval_changed = asyncio.Event()
        self._interval_s = settings.telemetry_interval_s
        self._interval_pinned = False
        self._heartbeat_s = settings.heartbeat_interval_s
        self._events: collections.deque[agent_pb2.AgentEvent] = collections.deque(maxlen=1000)
        self._host_inventory = fleet_pb2.HostInventory()
        self._gpu_inventory: list[fleet_pb2.GpuInventory] = []
        self._gpu_available = False
        self._boot_count = 0
        self._outgoing: asyncio.Queue[agent_pb2.ConnectRequest] | None = None
        self._commands: asyncio.Queue[agent_pb2.Command] = asyncio.Queue()
        self._in_flight: set[str] = set()
        self.connected = asyncio.Event()
        self.session_id = ""
        self.sessions_opened = 0
        self.acked_seq = 0
        self.last_sample: telemetry_pb2.TelemetrySample | None = None
        self.on_sample: Callable[[telemetry_pb2.TelemetrySample], None] | None = None
        self.certificates = CertificateKeeper(
            settings,
            mtls_credentials=self._credentials,
            channel_options=self._channel_options,
            rng=self._rng,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until `stop()`; never raises for a control plane that is down."""
        s = self.settings
        self._state = await asyncio.to_thread(
            AgentStateStore, s.state_dir / "agent.db", max_spool_samples=s.max_spool_samples
        )
        with log_context(node_id=s.node_id):
            try:
                self._boot_count = await asyncio.to_thread(self._state.next_boot)
                pinned_ms = await asyncio.to_thread(self._state.get_setting, _INTERVAL_SETTING)
                if pinned_ms:
                    self._interval_s, self._interval_pinned = pinned_ms / 1000, True
                if await asyncio.to_thread(self._state.is_cordoned):
                    # The hello has no field for it; the control plane keeps its own record.
                    log.info("this node is cordoned in Sentinel's scheduling view")
                await self._start_collectors()
                self._supervisor.start("collector", self._collect_loop)
                self._supervisor.start("commands", self._command_loop)
                self._supervisor.start("certificates", self.certificates.run)
                await self._connection_loop()
            finally:
                await self._supervisor.stop()
                if self._gpu is not None:
                    await self._gpu.stop()
                await asyncio.to_thread(self._state.close)

    def stop(self) -> None:
        self._stopping.set()

    async def _start_collectors(self) -> None:
        if self._host is not None:
            self._host_inventory = await asyncio.to_thread(self._host.inventory)
        else:
            self._host_inventory = fleet_pb2.HostInventory(
                hostname=platform.node(), os=platform.system(), architecture=platform.machine()
            )
        if self._gpu is not None:
            status = await self._gpu.start()
            self._gpu_available = status.state == telemetry_pb2.GPU_COLLECTION_STATE_OK
            if self._gpu_available:
                self._gpu_inventory = await self._gpu.inventory()
            log.info(
                "GPU collection: %s",
                status.message or telemetry_pb2.GpuCollectionState.Name(status.state),
            )

    def metrics_collector(self) -> Collector:
        """A prometheus_client collector of the agent's own session state."""
        agent = self

        class _SessionMetrics(Collector):
            def collect(self) -> Iterator[Metric]:
                connected = GaugeMetricFamily(
                    "sentinel_agent_connected", "1 while a session with the control plane is open."
                )
                connected.add_metric([], 1.0 if agent.connected.is_set() else 0.0)
                yield connected
                sessions = CounterMetricFamily(
                    "sentinel_agent_sessions", "Sessions opened since the agent started."
                )
                sessions.add_metric([], agent.sessions_opened)
                yield sessions
                acked = GaugeMetricFamily(
                    "sentinel_agent_telemetry_acked_seq",
                    "Highest telemetry seq the control plane acknowledged.",
                )
                acked.add_metric([], agent.acked_seq)
                yield acked
                keeper = agent.certificates
                valid = GaugeMetricFamily(
                    "sentinel_agent_certificate_valid",
                    "1 while the agent holds an unexpired client certificate; 0 means it cannot "
                    "connect until it gets new certificate files or a bootstrap token.",
                )
                valid.add_metric([], 1.0 if keeper.valid else 0.0)
                yield valid
                expiry = GaugeMetricFamily(
                    "sentinel_agent_certificate_expiry_timestamp_seconds",
                    "When the agent's client certificate expires (Unix time; 0 when none).",
                )
                current = keeper.current
                expiry.add_metric([], current.not_after.timestamp() if current else 0.0)
                yield expiry

        return _SessionMetrics()

    # -- telemetry -----------------------------------------------------------------------------

    async def _collect_once(self) -> None:
        assert self._state is not None
        host = await asyncio.to_thread(self._host.collect) if self._host is not None else None
        reading = await self._gpu.collect() if self._gpu is not None else None
        collect_time = _now_ts()
        built: list[telemetry_pb2.TelemetrySample] = []

        def serialize(seq: int) -> bytes:
            sample = telemetry_pb2.TelemetrySample(
                seq=seq, node_id=self.settings.node_id, collect_time=collect_time
            )
            if host is not None:
                sample.host.CopyFrom(host)
            if reading is not None:
                sample.gpus.extend(reading.gpus)
                sample.gpu_status.CopyFrom(reading.status)
            else:
                sample.gpu_status.state = telemetry_pb2.GPU_COLLECTION_STATE_NO_GPU
                sample.gpu_status.message = "GPU collection disabled"
            built.append(sample)
            return sample.SerializeToString()

        await asyncio.to_thread(self._state.spool, serialize)
        if reading is not None:
            self._events.extend(reading.events)
            ok = reading.status.state == telemetry_pb2.GPU_COLLECTION_STATE_OK
            if ok and not self._gpu_available and self._gpu is not None:
                # A driver that appeared after start: the next hello carries the inventory.
                self._gpu_inventory = await self._gpu.inventory()
                self._gpu_available = True
        self.last_sample = built[0]
        if self.on_sample is not None:
            self.on_sample(built[0])
        self._new_sample.set()

    async def _collect_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._collect_once()
            except Exception:
                log.exception("telemetry collection failed; next attempt in one interval")
            self._interval_changed.clear()
            remaining = self._interval_s - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interval_changed.wait(), remaining)

    def _interval(self) -> float:
        return self._interval_s

    async def _set_interval(self, seconds: float) -> None:
        assert self._state is not None
        await asyncio.to_thread(self._state.put_setting, _INTERVAL_SETTING, int(seconds * 1000))
        self._interval_s, self._interval_pinned = seconds, True
        self._interval_changed.set()
        log.info("telemetry interval set to %g s", seconds)

    # -- connection ----------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        s = self.settings
        attempt = 0
        while not self._stopping.is_set():
            if not await self._certificate_ready():
                return
            delay: float | None = None
            welcomed = False
            try:
                delay, welcomed = await self._session()
            except grpc.aio.AioRpcError as exc:
                level = (
                    logging.ERROR
                    if exc.code()
                    in (
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.INVALID_ARGUMENT,
                    )
                    else logging.WARNING
                )
                log.log(level, "session ended: %s: %s", exc.code().name, exc.details())
            except (SessionRefused, TimeoutError) as exc:
                log.warning("session failed: %s", exc or "no welcome in time")
            except OSError as exc:
                log.error("cannot read TLS files: %s", exc)
            finally:
                self.connected.clear()
                self.session_id = ""
            if welcomed:
                attempt = 0
            if delay is None:
                delay = backoff_delay(attempt, s.backoff_base_s, s.backoff_cap_s, self._rng)
                attempt += 1
            if self._stopping.is_set():
                return
            log.info("reconnecting in %.2f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _certificate_ready(self) -> bool:
        """Waits until there is a valid certificate to connect with; False when stopping."""
        if self.certificates.ready.is_set():
            return True
        ready = asyncio.ensure_future(self.certificates.ready.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        await asyncio.gather(ready, stopping, return_exceptions=True)
        return not self._stopping.is_set()

    def _credentials(self) -> grpc.ChannelCredentials:
        s = self.settings
        return grpc.ssl_channel_credentials(
            root_certificates=s.ca.read_bytes(),
            private_key=s.key.read_bytes(),
            certificate_chain=s.cert.read_bytes(),
        )

    def _channel_options(self) -> list[tuple[str, int | str]]:
        s = self.settings
        options: list[tuple[str, int | str]] = [
            ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Our own backoff decides when to retry; keep gRPC's from stacking on top of it.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if s.server_name_override:
            options.append(("grpc.ssl_target_name_override", s.server_name_override))
        return options

    async def _hello(self) -> agent_pb2.ConnectRequest:
        assert self._state is not None
        next_seq = await asyncio.to_thread(self._state.next_seq)
        oldest, _count = await asyncio.to_thread(self._state.spool_bounds)
        last_command = await asyncio.to_thread(self._state.last_executed_command_id)
        return agent_pb2.ConnectRequest(
            hello=agent_pb2.Hello(
                node_id=self.settings.node_id,
                agent_version=AGENT_VERSION,
                capabilities=capabilities(self._gpu_available),
                host=self._host_inventory,
                gpus=self._gpu_inventory,
                resume=agent_pb2.ResumeState(
                    next_telemetry_seq=next_seq,
                    oldest_unacked_seq=oldest,
                    last_executed_command_id=last_command,
                    boot_count=self._boot_count,
                ),
            )
        )

    async def _session(self) -> tuple[float | None, bool]:
        """One session; returns (delay the control plane asked for, whether it was welcomed)."""
        s = self.settings
        hello = await self._hello()
        # Read on every attempt, so a renewed certificate on disk is used at the next connect.
        async with self.certificates.files_lock:
            credentials = await asyncio.to_thread(self._credentials)
        channel = grpc.aio.secure_channel(s.control_plane, credentials, self._channel_options())
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        tasks = Supervisor("session")
        try:
            await call.write(hello)  # at once: a silent new stream risks being dropped
            first = await asyncio.wait_for(call.read(), s.connect_timeout_s)
            if first is grpc.aio.EOF:
                await call.wait_for_connection()
                raise SessionRefused(f"stream closed before welcome: {await call.details()}")
            if first.WhichOneof("message") != "welcome":
                raise SessionRefused(f"expected welcome, got {first.WhichOneof('message')}")
            welcome = first.welcome
            self.session_id = welcome.session_id
            self.sessions_opened += 1
            await self._acknowledge(welcome.acked_telemetry_seq)
            if welcome.heartbeat_interval.ToNanoseconds() > 0:
                self._heartbeat_s = welcome.heartbeat_interval.ToNanoseconds() / 1e9
            if not self._interval_pinned and welcome.telemetry_interval.ToNanoseconds() > 0:
                self._interval_s = welcome.telemetry_interval.ToNanoseconds() / 1e9
                self._interval_changed.set()
            max_batch = welcome.max_batch_samples or 100
            with log_context(session_id=welcome.session_id):
                log.info("session open; resending from seq %d", welcome.acked_telemetry_seq + 1)
                self.connected.set()
                outgoing: asyncio.Queue[agent_pb2.ConnectRequest] = asyncio.Queue()
                self._outgoing = outgoing
                tasks.start("writer", lambda: self._write_loop(call, outgoing), restart=False)
                tasks.start(
                    "telemetry",
                    lambda: self._pump_telemetry(outgoing, welcome.acked_telemetry_seq, max_batch),
                    restart=False,
                )
                tasks.start("heartbeat", lambda: self._heartbeat_loop(outgoing), restart=False)
                return await self._read_loop(call), True
        finally:
            self._outgoing = None
            await tasks.stop()
            call.cancel()
            await channel.close()

    async def _read_loop(self, call: Any) -> float | None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    read.cancel()
                    # The stream may have ended under us (the server went away at the same
                    # moment); half-closing it then fails, and there is nothing left to close.
                    with contextlib.suppress(Exception):
                        await call.done_writing()
                    return 0.0
                message = read.result()
                if message is grpc.aio.EOF:
                    code = await call.code()
                    log.warning(
                        "control plane ended the session: %s %s", code.name, await call.details()
                    )
                    return None
                kind = message.WhichOneof("message")
                if kind == "telemetry_ack":
                    await self._acknowledge(message.telemetry_ack.seq)
                elif kind == "command":
                    self._receive_command(message.command)
                elif kind == "config_update":
                    interval = message.config_update.telemetry_interval.ToNanoseconds() / 1e9
                    if interval > 0:
                        self._interval_s = interval
                        self._interval_changed.set()
                elif kind == "go_away":
                    delay: float = message.go_away.reconnect_after.ToNanoseconds() / 1e9
                    log.info("control plane going away (%s)", message.go_away.reason)
                    # Jitter the requested delay too, so the fleet does not return all at once.
                    return delay + self._rng.uniform(0, max(delay, self.settings.backoff_base_s))
                elif kind == "cancel_command":
                    log.info("cancel requested for %s", message.cancel_command.command_id)
        finally:
            stopping.cancel()

    async def _acknowledge(self, seq: int) -> None:
        if seq > self.acked_seq or seq == 0:
            assert self._state is not None
            await asyncio.to_thread(self._state.acknowledge, seq)
            self.acked_seq = max(self.acked_seq, seq)

    @staticmethod
    async def _write_loop(call: Any, outgoing: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        while True:
            message = await outgoing.get()
            try:
                await call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream ended under us; the reader sees why and the session is retried.
                # Whatever was queued is re-sent from the spool or re-delivered by the server.
                return

    async def _pump_telemetry(
        self, outgoing: asyncio.Queue[agent_pb2.ConnectRequest], acked: int, max_batch: int
    ) -> None:
        """Sends everything in the spool after `acked`, then each new sample as it comes."""
        assert self._state is not None
        sent_up_to = acked
        while True:
            self._new_sample.clear()
            rows = await asyncio.to_thread(self._state.unsent, sent_up_to, max_batch)
            if rows:
                batch = agent_pb2.TelemetryBatch(dropped_samples=self._state.dropped_since_report)
                self._state.dropped_since_report = 0
                for seq, payload in rows:
                    batch.samples.add().ParseFromString(payload)
                    sent_up_to = seq
                outgoing.put_nowait(agent_pb2.ConnectRequest(telemetry=batch))
            while self._events:
                outgoing.put_nowait(agent_pb2.ConnectRequest(event=self._events.popleft()))
            if len(rows) < max_batch:
                await self._new_sample.wait()

    async def _heartbeat_loop(self, outgoing: asyncio.Queue[agent_pb2.ConnectRequest]) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            outgoing.put_nowait(
                agent_pb2.ConnectRequest(heartbeat=agent_pb2.Heartbeat(send_time=_now_ts()))
            )

    # -- commands ------------------------------------------------------------------------------

    def _send(self, message: agent_pb2.ConnectRequest) -> bool:
        """Queues a message on the open session; False when there is none (it is dropped)."""
        if self._outgoing is None:
            return False
        self._outgoing.put_nowait(message)
        return True

    def _receive_command(self, command: agent_pb2.Command) -> None:
        if command.command_id in self._in_flight:
            # Re-delivered while we are still on it: confirm, the result follows when done.
            self._send(
                agent_pb2.ConnectRequest(
                    command_ack=agent_pb2.CommandAck(command_id=command.command_id)
                )
            )
            return
        self._in_flight.add(command.command_id)
        self._commands.put_nowait(command)

    async def _command_loop(self) -> None:
        """One command at a time, in the order received: ordering is part of the contract.
        Runs for the agent's life, not a session's, so a dropped session never cuts a command
        short; a result that finds no session is re-sent when the command is re-delivered."""
        while True:
            command = await self._commands.get()
            try:
                with log_context(command_id=command.command_id):
                    result = await self._execute(command)
                self._send(agent_pb2.ConnectRequest(command_result=result))
            finally:
                self._in_flight.discard(command.command_id)

    async def _execute(self, command: agent_pb2.Command) -> agent_pb2.CommandResult:
        assert self._state is not None
        state = self._state
        self._send(
            agent_pb2.ConnectRequest(
                command_ack=agent_pb2.CommandAck(command_id=command.command_id)
            )
        )
        done = await asyncio.to_thread(state.executed, command.command_id)
        if done is not None:
            if done.finished and done.result is not None:
                # Delivered again (our result was lost with the last session): same result.
                result = agent_pb2.CommandResult.FromString(done.result)
            else:
                result = self._result(
                    command,
                    "FAILED",
                    "the agent restarted while executing this command; "
                    "it is not run again and its effect is unknown",
                    None,
                    _now_ts(),
                )
                await asyncio.to_thread(
                    state.mark_finished, command.command_id, result.SerializeToString()
                )
            return result

        started = _now_ts()
        await asyncio.to_thread(state.mark_started, command.command_id)
        deadline = command.deadline.ToDatetime(dt.UTC) if command.HasField("deadline") else None
        remaining = (
            (deadline - dt.datetime.now(dt.UTC)).total_seconds()
            if deadline
            else self.settings.command_timeout_s
        )
        action = ACTIONS.get(command.action)
        output: dict[str, Any] | None = None
        if remaining <= 0:
            outcome, message = "EXPIRED", "the deadline passed before the command could start"
        elif action is None:
            outcome, message = (
                "UNSUPPORTED",
                f"action {command.action!r} is not supported by this agent",
            )
        else:
            controls = AgentControls(
                self._interval,
                self._set_interval,
                state=state,
                state_dir=self.settings.state_dir,
                gpu=self._gpu,
            )
            parameters = json_format.MessageToDict(command.parameters)
            try:
                output = await asyncio.wait_for(
                    action(controls, parameters), min(remaining, self.settings.command_timeout_s)
                )
                outcome, message = "SUCCEEDED", ""
            except ActionError as exc:
                outcome, message = exc.outcome, str(exc)
            except TimeoutError:
                outcome, message = "FAILED", f"{command.action} did not finish before its deadline"
            except Exception as exc:
                log.exception("action %s failed", command.action)
                outcome, message = "FAILED", f"{command.action} failed: {exc}"
        log.info("command %s finished: %s %s", command.action, outcome, message)
        result = self._result(command, outcome, message, output, started)
        await asyncio.to_thread(state.mark_finished, command.command_id, result.SerializeToString())
        return result

    @staticmethod
    def _result(
        command: agent_pb2.Command,
        outcome: str,
        message: str,
        output: dict[str, Any] | None,
        started: timestamp_pb2.Timestamp,
    ) -> agent_pb2.CommandResult:
        result = agent_pb2.CommandResult(
            command_id=command.command_id,
            outcome=_OUTCOMES[outcome],
            message=message,
            start_time=started,
            finish_time=_now_ts(),
        )
        if output:
            struct = struct_pb2.Struct()
            struct.update(output)
            result.output.CopyFrom(struct)
        return result
