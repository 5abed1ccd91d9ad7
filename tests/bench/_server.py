"""The measured process: one server under test (the bare gRPC baseline or Sentinel's control
plane) plus the measurement itself, and nothing else; the agents it serves are simulated in
other processes, so this process's CPU time and RSS are the server's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import os
import pathlib
import random
import re
import time
import traceback
import tracemalloc
import urllib.request
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2
from sentinel.v1 import agent_pb2, agent_pb2_grpc

from tests.bench import _messages
from tests.bench._ipc import Message, percentile, receive, rss_bytes, thread_count
from tests.bench._simulator import SimulatorConfig, simulator_process_main

TELEMETRY_COUNTER = "sentinel_telemetry_samples_received_total"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """One measurement of one server."""

    kind: str
    """"baseline" or "sentinel"."""
    agents: int
    window_s: float
    interval_s: float
    pings: int
    """`ping` commands sent to random agents under steady load (Sentinel only)."""
    ramp: int
    """Connection attempts in flight at once, over all simulator processes."""
    simulator_processes: int
    slices: int
    """The window is cut into this many slices, each measured on its own, to show spread."""
    work_dir: str
    """Holds the certificates (ca.pem, server.pem, server.key, one pair per agent)."""
    database: str
    """SQLite file of the control plane (Sentinel only)."""
    connect_timeout_s: float
    pings_in_window: bool = False
    """Send the pings inside the CPU window (their cost then counts as telemetry's)."""
    ping_spacing_s: float = 0.05
    """Time between ping starts when they run after the window."""
    keepalive_s: float = 30.0
    seed: int = 1
    grpc_options: tuple[tuple[str, int | str], ...] = ()
    """Extra gRPC server options given to both servers (experiments: `--grpc-option`)."""
    settings: tuple[tuple[str, str], ...] = ()
    """Control-plane settings overridden for Sentinel (`--setting`), as their text."""


class ServerUnderTest(Protocol):
    port: int
    counter_source: str
    """Where `received()` comes from, for the report."""

    async def start(self) -> None: ...

    def received(self) -> float | None:
        """Telemetry messages received so far, or None when the server does not count them."""

    async def ping(self, node_id: str) -> None:
        """Sends a `ping` command and returns when its result is in; raises on failure."""

    async def stop(self) -> None: ...


# -- the baseline: bare grpc.aio ---------------------------------------------------------------


def baseline_server_options(keepalive_s: float) -> list[tuple[str, int]]:
    """The control plane's server options (controlplane/app.py, `_server_options`), copied: the
    baseline must pay for the same keepalive and flow-control behaviour, nothing more."""
    keepalive_ms = int(keepalive_s * 1000)
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", max(keepalive_ms // 2, 1000)),
        ("grpc.http2.max_ping_strikes", 3),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.tsi.max_frame_size", 4096),
    ]


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


class CountingAgentService(agent_pb2_grpc.AgentServiceServicer):
    """Decodes every message and counts telemetry; answers the hello only because the protocol
    needs a Welcome before an agent sends telemetry."""

    def __init__(self, interval_s: float) -> None:
        self.telemetry_messages = 0
        self._welcome = agent_pb2.ConnectResponse(
            welcome=agent_pb2.Welcome(
                session_id="baseline",
                telemetry_interval=_duration(interval_s),
                heartbeat_interval=_duration(10.0),
                max_batch_samples=500,
            )
        )

    # A coroutine that writes through the context, as the control plane's handler is; the
    # generated stub types only the async-generator form.
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "telemetry":
                self.telemetry_messages += 1
            elif kind == "hello":
                await context.write(self._welcome)

    async def RenewCertificate(
        self, request: agent_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")
        raise AssertionError("unreachable: abort raises")


class BaselineServer:
    counter_source = "baseline handler"

    def __init__(self, config: RunConfig) -> None:
        self._config = config
        self._service = CountingAgentService(config.interval_s)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        directory = pathlib.Path(self._config.work_dir)
        credentials = grpc.ssl_server_credentials(
            [((directory / "server.key").read_bytes(), (directory / "server.pem").read_bytes())],
            root_certificates=(directory / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        server = grpc.aio.server(
            options=[
                *baseline_server_options(self._config.keepalive_s),
                *self._config.grpc_options,
            ]
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self._service, server)
        self.port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self._server = server

    def received(self) -> float:
        return float(self._service.telemetry_messages)

    async def ping(self, node_id: str) -> None:
        raise NotImplementedError("the baseline sends no commands")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)


# -- Sentinel's control plane -----------------------------------------------------------------


class SentinelServer:
    """The control plane, started in this process through its public API."""

    def __init__(self, config: RunConfig) -> None:
        self._config = config
        self._control_plane: Any = None
        self.port = 0
        self.counter_source = f"control plane counter {TELEMETRY_COUNTER}"

    async def start(self) -> None:
        # Imported here so the baseline's process never loads the control plane's modules.
        from controlplane import ControlPlane, ControlPlaneSettings, TlsFiles

        directory = pathlib.Path(self._config.work_dir)
        settings = ControlPlaneSettings(
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            enrollment_listen="127.0.0.1:0",
            database_url=f"sqlite:///{self._config.database}",
            tls=TlsFiles(
                ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
            ),
            telemetry_interval_s=self._config.interval_s,
            keepalive_time_s=self._config.keepalive_s,
            extra_grpc_options=self._config.grpc_options,
        )
        if self._config.settings:
            settings = dataclasses.replace(
                settings, **_typed_settings(settings, dict(self._config.settings))
            )
        self._control_plane = ControlPlane(settings)
        await self._control_plane.start()
        self.port = self._control_plane.port
        if self._counter_from_registry() is None and self._counter_from_scrape() is None:
            self.counter_source = "simulator (messages sent; the control plane has no counter)"

    def _counter_from_registry(self) -> float | None:
        registry = getattr(self._control_plane, "metrics_registry", None)
        if registry is None:
            return None
        value = registry.get_sample_value(TELEMETRY_COUNTER)
        return None if value is None else float(value)

    def _counter_from_scrape(self) -> float | None:
        # Only used when the registry object is not reachable: a scrape renders every metric
        # on this process's CPU, which the measurement then includes.
        port = getattr(self._control_plane, "metrics_port", 0)
        if not port:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(TELEMETRY_COUNTER + " "):
                    return float(line.split()[1])
        return None

    def received(self) -> float | None:
        value = self._counter_from_registry()
        return value if value is not None else self._counter_from_scrape()

    async def ping(self, node_id: str) -> None:
        result = await self._control_plane.commands.send(node_id, "ping", {}, timeout=10.0)
        if not getattr(result, "succeeded", True):
            raise RuntimeError(f"ping on {node_id}: {result.outcome} {result.message}")

    async def stop(self) -> None:
        if self._control_plane is not None:
            await self._control_plane.stop()


def _typed_settings(settings: Any, overrides: dict[str, str]) -> dict[str, Any]:
    """`--setting` values converted to the type of the field they override."""
    typed: dict[str, Any] = {}
    for name, text in overrides.items():
        current = getattr(settings, name)
        if isinstance(current, bool):
            typed[name] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int | float):
            typed[name] = type(current)(text)
        else:
            typed[name] = text
    return typed


# -- the measurement --------------------------------------------------------------------------


@dataclass(slots=True)
class _Simulator:
    process: BaseProcess
    conn: Connection


def _start_simulators(config: RunConfig, port: int) -> list[_Simulator]:
    context = multiprocessing.get_context("spawn")
    simulators = []
    share, extra = divmod(config.agents, config.simulator_processes)
    first = 1
    for number in range(config.simulator_processes):
        count = share + (1 if number < extra else 0)
        sim_config = SimulatorConfig(
            target=f"127.0.0.1:{port}",
            cert_dir=config.work_dir,
            first_index=first,
            count=count,
            interval_s=config.interval_s,
            ramp=max(1, config.ramp // config.simulator_processes),
            connect_timeout_s=config.connect_timeout_s,
            keepalive_s=config.keepalive_s,
        )
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=simulator_process_main,
            args=(sim_config, child_end),
            name=f"bench-simulator-{number + 1}",
            daemon=True,
        )
        process.start()
        child_end.close()
        simulators.append(_Simulator(process, parent_end))
        first += count
    return simulators


async def _expect(simulator: _Simulator, kind: str, timeout: float) -> Message:
    message = await receive(simulator.conn, timeout)
    if message["type"] == "error":
        raise RuntimeError(f"{simulator.process.name} failed: {message['message']}")
    if message["type"] != kind:
        raise RuntimeError(f"{simulator.process.name}: expected {kind!r}, got {message!r}")
    return message


async def _counts(simulators: list[_Simulator]) -> list[Message]:
    for simulator in simulators:
        simulator.conn.send({"type": "count"})
    return [await _expect(s, "count", 30.0) for s in simulators]


async def _ping_loop(
    server: ServerUnderTest, config: RunConfig, started: float, duration_s: float
) -> Message:
    """Sends `config.pings` pings one at a time, spread evenly over `duration_s`, each to a
    random agent, and times each around the control plane's `commands.send`."""
    rng = random.Random(config.seed)
    spacing = duration_s / config.pings
    round_trips: list[float] = []
    failures: list[str] = []
    for number in range(config.pings):
        delay = started + (number + 0.5) * spacing - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        node = _messages.node_id(rng.randint(1, config.agents))
        sent = time.perf_counter()
        try:
            await server.ping(node)
        except Exception as exc:
            failures.append(f"{node}: {type(exc).__name__}: {exc}")
            continue
        round_trips.append(time.perf_counter() - sent)
    return {
        "pings_sent": config.pings,
        "ping_phase": "during the window" if config.pings_in_window else "after the window",
        "ping_round_trips_ms": [t * 1000 for t in round_trips],
        "ping_p50_ms": percentile(round_trips, 50) * 1000 if round_trips else None,
        "ping_p99_ms": percentile(round_trips, 99) * 1000 if round_trips else None,
        "ping_max_ms": max(round_trips) * 1000 if round_trips else None,
        "ping_failures": failures[:10],
        "ping_failed": len(failures),
    }


NO_PINGS: Message = {
    "pings_sent": 0,
    "ping_phase": None,
    "ping_round_trips_ms": [],
    "ping_p50_ms": None,
    "ping_p99_ms": None,
    "ping_max_ms": None,
    "ping_failures": [],
    "ping_failed": 0,
}


async def _steady_window(
    server: ServerUnderTest, config: RunConfig, simulators: list[_Simulator]
) -> Message:
    before = await _counts(simulators)
    started = time.monotonic()
    cpu_start = time.process_time()
    received_start = server.received()
    pinger = (
        asyncio.create_task(_ping_loop(server, config, started, config.window_s))
        if config.kind == "sentinel" and config.pings > 0 and config.pings_in_window
        else None
    )
    slices: list[tuple[float, float | None]] = []
    cpu_previous, received_previous = cpu_start, received_start
    for number in range(1, config.slices + 1):
        await asyncio.sleep(
            max(0.0, started + number * config.window_s / config.slices - time.monotonic())
        )
        cpu_now, received_now = time.process_time(), server.received()
        delta = None
        if received_now is not None and received_previous is not None:
            delta = received_now - received_previous
        slices.append((cpu_now - cpu_previous, delta))
        cpu_previous, received_previous = cpu_now, received_now
    cpu_s = time.process_time() - cpu_start
    elapsed = time.monotonic() - started
    received_end = server.received()
    after = await _counts(simulators)
    pings = NO_PINGS if pinger is None else await pinger

    sent = sum(a["sent"] - b["sent"] for a, b in zip(after, before, strict=True))
    simulator_cpu = sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before, strict=True))
    if received_start is not None and received_end is not None:
        messages, source = received_end - received_start, server.counter_source
    else:
        messages, source = float(sent), "simulator (messages sent; no server counter)"
    per_slice = [cpu / n * 1e6 for cpu, n in slices if n]
    return {
        "window_s": elapsed,
        "cpu_s": cpu_s,
        "server_core_percent": 100 * cpu_s / elapsed,
        "messages": messages,
        "messages_source": source,
        "messages_per_s": messages / elapsed,
        "expected_messages": config.agents * elapsed / config.interval_s,
        "simulator_sent": sent,
        "simulator_core_percent": 100 * simulator_cpu / elapsed,
        "cpu_us_per_message": cpu_s / messages * 1e6 if messages else None,
        "slice_cpu_us_per_message": per_slice,
        "slice_median_cpu_us_per_message": percentile(per_slice, 50) if per_slice else None,
        **pings,
        "open_streams_at_end": sum(a["open_streams"] for a in after),
    }


class UnhandledErrors:
    """Counts what asyncio reports as unhandled in the server (e.g. "Task exception was never
    retrieved") instead of printing thousands of tracebacks: the report shows how many and the
    first few kinds, which is what a reader of the benchmark needs to chase them."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.count += 1
        exception = context.get("exception")
        text = context.get("message", "")
        if exception is not None:
            text = f"{text}: {type(exception).__name__}: {exception}"
        task = context.get("future")
        if isinstance(task, asyncio.Task):
            text = f"{text} (in {task.get_coro()!r})"
        # Object addresses make every report unique; without them, repeats collapse into one.
        text = re.sub(r" at 0x[0-9a-f]+", "", text)
        if len(self.examples) < 5 and text not in self.examples:
            self.examples.append(text)


class GcPauses:
    """Times the garbage collector's pauses while `active`: with thousands of sessions a full
    collection walks millions of objects, and the event loop stands still meanwhile."""

    def __init__(self) -> None:
        self.active = False
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.collected: dict[int, int] = {0: 0, 1: 0, 2: 0}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.active:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)
            self.collected[info["generation"]] += info.get("collected", 0)

    def figures(self) -> Message:
        return {
            f"gc_gen{generation}": {
                "collections": len(pauses),
                "total_ms": sum(pauses) * 1000,
                "max_ms": max(pauses, default=0.0) * 1000,
                "collected": self.collected[generation],
            }
            for generation, pauses in self.pauses.items()
        }


async def _loop_lag(stop: asyncio.Event, period_s: float = 0.1) -> list[float]:
    """How late the event loop wakes a sleeper, sampled every `period_s`: every message and
    command waits at least this long when the loop is busy or stalled."""
    loop = asyncio.get_running_loop()
    lags = []
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(period_s)
        lags.append(loop.time() - started - period_s)
    return lags


def _start_tracemalloc() -> bool:
    """With SENTINEL_BENCH_TRACEMALLOC=N (frames per trace), allocations are traced and the
    lines whose memory grew most between the start and the end of the window are printed: where
    the per-agent RSS goes. Tracing slows the server several times: no figure of such a run is
    a measurement."""
    frames = int(os.environ.get("SENTINEL_BENCH_TRACEMALLOC", "0") or 0)
    if frames <= 0:
        return False
    tracemalloc.start(frames)
    return True


def _report_allocations(config: RunConfig, before: tracemalloc.Snapshot) -> None:
    after = tracemalloc.take_snapshot()
    key = "traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno"
    growth = after.compare_to(before, key)
    total = sum(stat.size_diff for stat in growth)
    print(
        f"  {config.kind}: traced Python allocations grew {total / 1024:.0f} KiB = "
        f"{total / 1024 / config.agents:.1f} KiB per agent; largest:",
        flush=True,
    )
    for stat in growth[:30]:
        where = " <- ".join(
            f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in stat.traceback
        )
        print(
            f"    {stat.size_diff / config.agents:8.0f} B/agent "
            f"{stat.count_diff:+8d} blocks  {where}",
            flush=True,
        )


async def measure(config: RunConfig) -> Message:
    unhandled = UnhandledErrors()
    asyncio.get_running_loop().set_exception_handler(unhandled)
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    server: ServerUnderTest = (
        SentinelServer(config) if config.kind == "sentinel" else BaselineServer(config)
    )
    traced = _start_tracemalloc()
    await server.start()
    # Let start-up allocations and background tasks settle before the reference reading.
    gc.collect()
    await asyncio.sleep(1.0)
    rss_before = rss_bytes()
    before_snapshot = tracemalloc.take_snapshot() if traced else None
    print(
        f"  {config.kind}: serving on port {server.port}; connecting {config.agents} agents",
        flush=True,
    )
    simulators = _start_simulators(config, server.port)
    try:
        connected = [
            await _expect(s, "connected", config.connect_timeout_s + 120) for s in simulators
        ]
        welcomed = sum(c["welcomed"] for c in connected)
        welcomes = [c["all_welcome"] for c in connected]
        connect_s = (
            max(welcomes) - min(c["first_attempt"] for c in connected)
            if all(w is not None for w in welcomes)
            else None
        )
        connect_text = f"{connect_s:.1f} s" if connect_s is not None else "timed out"
        print(
            f"  {config.kind}: {welcomed}/{config.agents} agents connected ({connect_text}); "
            f"steady window of {config.window_s:g} s",
            flush=True,
        )
        # One full interval so that every agent is past its random first send and the server
        # sees the steady rate, not the ramp.
        await asyncio.sleep(config.interval_s + 1.0)
        gc_pauses.active = True
        if os.environ.get("SENTINEL_BENCH_GC_GARBAGE"):
            # Keep what the collector frees, to say which cycles the server makes.
            gc.set_debug(gc.DEBUG_SAVEALL)
        stop_lag_probe = asyncio.Event()
        lag_probe = asyncio.create_task(_loop_lag(stop_lag_probe))
        window = await _steady_window(server, config, simulators)
        rss_after = rss_bytes()
        if before_snapshot is not None:
            _report_allocations(config, before_snapshot)
        threads = thread_count()
        if config.kind == "sentinel" and config.pings > 0 and not config.pings_in_window:
            # Telemetry keeps flowing: the round trips are taken under the same steady load, but
            # the commands' own cost stays out of the CPU per telemetry message above.
            duration = config.pings * config.ping_spacing_s
            window.update(await _ping_loop(server, config, time.monotonic(), duration))
            after_pings = await _counts(simulators)
            window["open_streams_at_end"] = sum(a["open_streams"] for a in after_pings)
        stop_lag_probe.set()
        lags = await lag_probe
        if os.environ.get("SENTINEL_BENCH_GC_GARBAGE"):
            gc.collect()
            kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
            print(f"  {config.kind}: cyclic garbage by type: {kinds.most_common(20)}", flush=True)
            gc.set_debug(0)
            gc.garbage.clear()
        gc_pauses.active = False
        for simulator in simulators:
            simulator.conn.send({"type": "stop"})
        stopped = [await _expect(s, "stopped", 300.0) for s in simulators]
    finally:
        for simulator in simulators:
            simulator.process.join(timeout=30)
            if simulator.process.is_alive():
                simulator.process.terminate()
        await server.stop()
        # Collect now, so that tasks dropped with an exception are reported in this result.
        gc.collect()
        await asyncio.sleep(0)

    latencies = [t for c in connected for t in c["connect_latencies_s"]]
    errors: list[str] = []
    for message in (*connected, *stopped):
        errors.extend(e for e in message["errors"] if e not in errors)
    return {
        "kind": config.kind,
        "config": asdict(config),
        "agents": config.agents,
        "welcomed": welcomed,
        "connect_s": connect_s,
        "connect_attempts": sum(c["attempts"] for c in connected),
        "connect_failed_attempts": sum(c["failed_attempts"] for c in connected),
        "connect_p50_s": percentile(latencies, 50),
        "connect_p99_s": percentile(latencies, 99),
        "streams_lost": sum(s["streams_lost"] for s in stopped),
        "commands_answered": sum(s["commands_answered"] for s in stopped),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_per_agent_bytes": (rss_after - rss_before) / config.agents,
        "server_threads": threads,
        "errors": errors[:10],
        "loop_lag_p50_ms": percentile(lags, 50) * 1000,
        "loop_lag_p99_ms": percentile(lags, 99) * 1000,
        "loop_lag_max_ms": max(lags, default=0.0) * 1000,
        **gc_pauses.figures(),
        "unhandled_server_errors": unhandled.count,
        "unhandled_server_error_examples": unhandled.examples,
        **window,
    }


def server_process_main(config: RunConfig, conn: Connection) -> None:
    """Entry point of the measured process (multiprocessing, spawn)."""
    logging.basicConfig(
        level=logging.WARNING, format=f"{config.kind}: %(levelname)s %(name)s: %(message)s"
    )
    try:
        result = asyncio.run(measure(config))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"type": "error", "message": traceback.format_exc()})
        raise
    conn.send({"type": "result", "result": result})
