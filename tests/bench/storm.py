"""The reconnect-storm benchmark: N simulated agents (one mTLS connection each) connected to a
control plane process, which is SIGKILLed and restarted on the same port and database; then how
long until every agent is back, how long until every agent's telemetry is stored, how many
sessions were told to retry later, and how fast operator calls are answered meanwhile.

    python -m tests.bench.storm [--agents 5000] [--compare] [--json out.json]

See tests/bench/README.md ("Reconnect-storm benchmark") for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import IO, Any

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import grpc
from google.protobuf import struct_pb2
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc, plan_pb2, plan_pb2_grpc
from sqlalchemy import create_engine, text

from certs import CertificateAuthority, Identity, write_private_key
from tests.bench import _messages
from tests.bench._ipc import Message, percentile, raise_fd_limit, receive
from tests.bench._simulator import SimulatorConfig, simulator_process_main

TRUST_DOMAIN = "sentinel.local"
GOAL_BACK_S = 60.0
PROBE_EVERY_S = 0.5
PROBE_TIMEOUT_S = 10.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.storm",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--agents", type=int, default=5000, help="simulated agents (5000)")
    parser.add_argument(
        "--max-opening-sessions",
        type=int,
        default=512,
        help="the control plane's max_opening_sessions (default 512, as the control plane's; "
        "0: admission control off)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run with admission control off (or at 512 when --max-opening-sessions is 0)",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="telemetry interval (5 s)")
    parser.add_argument(
        "--steady", type=float, default=6.0, help="steady state before the kill, seconds (6)"
    )
    parser.add_argument(
        "--down", type=float, default=2.0, help="time between SIGKILL and restart, seconds (2)"
    )
    parser.add_argument(
        "--storm-timeout",
        type=float,
        default=120.0,
        help="how long after the restart the fleet may take to be back and caught up (120 s)",
    )
    parser.add_argument(
        "--min-storm",
        type=float,
        default=10.0,
        help="operator calls are sampled at least this long after the restart (10 s)",
    )
    parser.add_argument(
        "--ramp",
        type=int,
        default=250,
        help="first connections in flight at once, before the kill (250); reconnects are unpaced",
    )
    parser.add_argument(
        "--simulators", type=int, default=0, help="simulator processes (default: 1 per 2,500)"
    )
    parser.add_argument(
        "--attempt-timeout",
        type=float,
        default=10.0,
        help="how long an agent waits for its Welcome before retrying (10 s, the agent's default)",
    )
    parser.add_argument(
        "--attempt-timeout-max",
        type=float,
        default=60.0,
        help="longest wait for a Welcome after attempts in a row that timed out (60 s, the "
        "agent's default connect_timeout_max_s)",
    )
    parser.add_argument(
        "--backoff-cap",
        type=float,
        default=30.0,
        help="agents' reconnect backoff cap (30 s, the agent's default)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="the control plane's store (default: a fresh SQLite file per run); its sim-* agent "
        "rows are deleted before each run",
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.agents < 1 or args.interval <= 0 or args.steady < 0 or args.down < 0:
        parser.error("--agents and --interval must be positive, --steady and --down not negative")
    if args.simulators == 0:
        args.simulators = max(1, math.ceil(args.agents / 2500))
    return args


# -- setup ------------------------------------------------------------------------------------


def issue_certificates(directory: pathlib.Path, agents: int) -> None:
    """A fresh CA, a loopback server certificate, one client certificate per agent and one for
    the operator whose calls are timed."""
    ca = CertificateAuthority.create("Sentinel storm benchmark CA")
    (directory / "ca.pem").write_bytes(ca.certificate_pem)
    server = ca.issue_server()
    (directory / "server.pem").write_bytes(server.certificate_pem)
    write_private_key(directory / "server.key", server.private_key_pem)
    operator = ca.issue_client(Identity(TRUST_DOMAIN, "operator", "storm-bench"))
    (directory / "operator.pem").write_bytes(operator.certificate_pem)
    write_private_key(directory / "operator.key", operator.private_key_pem)
    for index in range(1, agents + 1):
        node = _messages.node_id(index)
        issued = ca.issue_client(Identity(TRUST_DOMAIN, "agent", node))
        (directory / f"{node}.pem").write_bytes(issued.certificate_pem)
        write_private_key(directory / f"{node}.key", issued.private_key_pem)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (from /proc; works for a child not yet reaped)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


class ControlPlaneProcess:
    """`sentinel-controlplane` (python -m controlplane.main) as a child process: started,
    SIGKILLed, restarted on the same port and database, its /metrics scraped."""

    def __init__(
        self,
        work_dir: pathlib.Path,
        database_url: str,
        interval_s: float,
        max_opening: int,
        log_path: pathlib.Path,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self._argv = [
            sys.executable,
            "-m",
            "controlplane.main",
            "--certs-dir",
            str(work_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--enrollment-listen",
            "",
            "--database-url",
            database_url,
            "--telemetry-interval-s",
            str(interval_s),
            "--max-opening-sessions",
            str(max_opening),
            "--log-level",
            "WARNING",
        ]
        self._log_path = log_path
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._log = open(self._log_path, "ab")  # noqa: SIM115 (closed in stop/kill)
        self.process = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=self._log)
        return self.process

    async def start(self, timeout_s: float = 120.0) -> None:
        """Starts the process and returns once it says it is listening."""
        process = self._spawn()
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout_s)
        if b"listening" not in line:
            process.kill()
            process.wait()
            raise RuntimeError(f"the control plane did not start ({line!r}); see {self._log_path}")

    def cpu_s(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close_log()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self._close_log()
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def scrape(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value} (labels as the exposition writes them)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        values: dict[str, float] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[key] = float(value)
        return values


def log_summary(path: pathlib.Path) -> dict[str, Any]:
    """Warnings and errors the control plane logged, counted by message shape, a few examples."""
    counts: dict[str, int] = {}
    examples: list[str] = []
    if not path.exists():
        return {"warnings": 0, "errors": 0, "kinds": {}, "examples": []}
    warnings = errors = 0
    for line in path.read_text(errors="replace").splitlines():
        # Python logging's levels, and gRPC core's own lines ("E1130 10:36:17.136196 ...").
        core_error = re.match(r"E\d{4} ", line) is not None
        level = "ERROR" if " ERROR " in line or "Traceback" in line or core_error else None
        level = level or ("WARNING" if " WARNING " in line else None)
        if level is None:
            continue
        if level == "ERROR":
            errors += 1
        else:
            warnings += 1
        body = line.split("] ", 1)[-1] if core_error else line.split(level, 1)[-1]
        shape = re.sub(r"\d+(\.\d+)?", "N", body.strip())[:100]
        counts[shape] = counts.get(shape, 0) + 1
        if len(examples) < 5 and shape not in {re.sub(r"\d+", "N", e)[:100] for e in examples}:
            examples.append(line[:240])
    top = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    return {"warnings": warnings, "errors": errors, "kinds": top, "examples": examples}


# -- simulators -------------------------------------------------------------------------------


@dataclass(slots=True)
class SimulatorHandle:
    process: BaseProcess
    conn: Connection
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def ask(self, kind: str, timeout: float = 60.0) -> Message:
        async with self.lock:
            self.conn.send({"type": kind})
            return await self.expect("stopped" if kind == "stop" else kind, timeout)

    async def expect(self, kind: str, timeout: float) -> Message:
        message = await receive(self.conn, timeout)
        if message["type"] == "error":
            raise RuntimeError(f"{self.process.name} failed: {message['message']}")
        if message["type"] != kind:
            raise RuntimeError(f"{self.process.name}: expected {kind!r}, got {message['type']!r}")
        return message


class Fleet:
    """The simulator processes, playing reconnecting agents."""

    def __init__(self, args: argparse.Namespace, work_dir: pathlib.Path, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.handles: list[SimulatorHandle] = []
        share, extra = divmod(args.agents, args.simulators)
        first = 1
        for number in range(args.simulators):
            count = share + (1 if number < extra else 0)
            config = SimulatorConfig(
                target=f"127.0.0.1:{port}",
                cert_dir=str(work_dir),
                first_index=first,
                count=count,
                interval_s=args.interval,
                ramp=max(1, args.ramp // args.simulators),
                attempt_timeout_s=args.attempt_timeout,
                attempt_timeout_max_s=args.attempt_timeout_max,
                connect_timeout_s=600.0,
                reconnect=True,
                backoff_cap_s=args.backoff_cap,
            )
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=simulator_process_main,
                args=(config, child_end),
                name=f"storm-simulator-{number + 1}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self.handles.append(SimulatorHandle(process, parent_end))
            first += count

    async def connected(self) -> list[Message]:
        return [await h.expect("connected", 660.0) for h in self.handles]

    async def counts(self) -> list[Message]:
        return list(await asyncio.gather(*(h.ask("count") for h in self.handles)))

    async def produced(self) -> dict[str, int]:
        replies = await asyncio.gather(*(h.ask("seqs") for h in self.handles))
        merged: dict[str, int] = {}
        for reply in replies:
            merged.update(reply["produced"])
        return merged

    async def stop(self) -> list[Message]:
        try:
            return list(await asyncio.gather(*(h.ask("stop", 120.0) for h in self.handles)))
        finally:
            for handle in self.handles:
                handle.process.join(timeout=30)
                if handle.process.is_alive():
                    handle.process.terminate()


# -- operator calls ---------------------------------------------------------------------------


def plan_request(nodes: list[str], i: int) -> plan_pb2.SubmitPlanRequest:
    """tests/bench/plans.py's plan (2 steps x 5 nodes), on the simulated nodes, validate only."""
    plan = plan_pb2.Plan(source="storm-bench", rationale="benchmark", confidence=0.5)
    for s, action in enumerate(("set_gpu_power_limit", "run_diagnostic")):
        step = plan.steps.add(step_id=f"s{s}", action=action)
        for k in range(5):
            step.targets.add(node_id=nodes[(i * 10 + k + s * 5) % len(nodes)])
        params = struct_pb2.Struct()
        params.update({"watts": 300} if action == "set_gpu_power_limit" else {})
        step.parameters.CopyFrom(params)
    plan.limits.max_nodes_in_parallel = 2
    return plan_pb2.SubmitPlanRequest(
        plan=plan, request_id=f"storm-{uuid.uuid4().hex}", validate_only=True
    )


@dataclass(slots=True)
class Probe:
    """Operator calls started every PROBE_EVERY_S, whatever the previous ones are doing."""

    target: str
    credentials: grpc.ChannelCredentials
    nodes: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, phase: str, stop: asyncio.Event) -> None:
        channel = grpc.aio.secure_channel(self.target, self.credentials)
        fleet = fleet_pb2_grpc.FleetServiceStub(channel)
        plans = plan_pb2_grpc.PlanServiceStub(channel)
        calls: list[asyncio.Task[None]] = []
        tick = 0

        async def timed(name: str, call: Any) -> None:
            started = time.monotonic()
            error = None
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            self.samples.append(
                {
                    "phase": phase,
                    "call": name,
                    "at": started,
                    "latency_s": time.monotonic() - started,
                    "error": error,
                }
            )

        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.channel_ready(), PROBE_TIMEOUT_S)
            loop = asyncio.get_running_loop()
            due = loop.time()
            while not stop.is_set():
                calls.append(
                    asyncio.create_task(
                        timed(
                            "ListAgents",
                            fleet.ListAgents(
                                fleet_pb2.ListAgentsRequest(page_size=100),
                                timeout=PROBE_TIMEOUT_S,
                            ),
                        )
                    )
                )
                calls.append(
                    asyncio.create_task(
                        timed(
                            "SubmitPlan",
                            plans.SubmitPlan(
                                plan_request(self.nodes, tick), timeout=PROBE_TIMEOUT_S
                            ),
                        )
                    )
                )
                tick += 1
                due += PROBE_EVERY_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
            await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await channel.close()

    def figures(self, phase: str, call: str) -> dict[str, Any]:
        mine = [s for s in self.samples if s["phase"] == phase and s["call"] == call]
        ok = [s["latency_s"] * 1000 for s in mine if s["error"] is None]
        failed = [s["error"] for s in mine if s["error"] is not None]
        return {
            "calls": len(mine),
            "failed": len(failed),
            "failures": sorted(set(failed))[:3],
            "p50_ms": percentile(ok, 50) if ok else None,
            "p99_ms": percentile(ok, 99) if ok else None,
            "max_ms": max(ok) if ok else None,
        }


# -- the store --------------------------------------------------------------------------------


class Watermarks:
    """Reads every simulated agent's stored telemetry watermark and gap count from the store."""

    def __init__(self, database_url: str) -> None:
        self._engine = create_engine(database_url)

    def read(self) -> tuple[dict[str, int], int]:
        with self._engine.connect() as db:
            rows = db.execute(
                text(
                    "SELECT node_id, last_telemetry_seq, telemetry_gap_samples FROM agents "
                    "WHERE node_id LIKE 'sim-%'"
                )
            ).all()
        return {str(r[0]): int(r[1]) for r in rows}, sum(int(r[2] or 0) for r in rows)

    def behind(self, produced: dict[str, int]) -> tuple[int, int]:
        """(agents whose stored watermark is below `produced`, samples missing in all)."""
        stored, _gaps = self.read()
        missing = [seq - stored.get(node, 0) for node, seq in produced.items()]
        late = [m for m in missing if m > 0]
        return len(late), sum(late)

    def reset(self) -> None:
        """Deletes the simulated agents' rows (a shared --database-url, between runs)."""
        with contextlib.suppress(Exception), self._engine.begin() as db:
            db.execute(text("DELETE FROM agents WHERE node_id LIKE 'sim-%'"))

    def close(self) -> None:
        self._engine.dispose()


# -- one run ----------------------------------------------------------------------------------


def _sum_failures(snapshots: list[Message]) -> dict[str, int]:
    total: dict[str, int] = {}
    for snapshot in snapshots:
        for kind, count in snapshot["failures"].items():
            total[kind] = total.get(kind, 0) + count
    return total


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(keys)
        if after.get(k, 0) != before.get(k, 0)
    }


async def run_storm(
    args: argparse.Namespace, work_dir: pathlib.Path, max_opening: int, label: str
) -> Message:
    database_url = args.database_url or f"sqlite:///{work_dir / f'storm-{label}.db'}"
    log_path = work_dir / f"controlplane-{label}.log"
    cp = ControlPlaneProcess(work_dir, database_url, args.interval, max_opening, log_path)
    result: Message = {"label": label, "max_opening_sessions": max_opening, "agents": args.agents}
    marks = Watermarks(database_url)
    if args.database_url:
        marks.reset()
    nodes = [_messages.node_id(i) for i in range(1, args.agents + 1)]
    credentials = grpc.ssl_channel_credentials(
        (work_dir / "ca.pem").read_bytes(),
        (work_dir / "operator.key").read_bytes(),
        (work_dir / "operator.pem").read_bytes(),
    )
    probe = Probe(f"127.0.0.1:{cp.port}", credentials, nodes)
    await cp.start()
    fleet = Fleet(args, work_dir, cp.port)
    try:
        # 1. The fleet connects (paced by the ramp), then runs steadily; operator calls sampled.
        connected = await fleet.connected()
        welcomed = sum(m["welcomed"] for m in connected)
        ends = [m["all_welcome"] for m in connected]
        result["initial_welcomed"] = welcomed
        result["initial_connect_s"] = (
            max(ends) - min(m["first_attempt"] for m in connected) if None not in ends else None
        )
        print(f"  [{label}] {welcomed}/{args.agents} agents connected", flush=True)
        if welcomed < args.agents:
            raise RuntimeError(f"only {welcomed} of {args.agents} agents connected at first")
        await asyncio.sleep(args.interval)  # every agent has produced its first sample
        stop_probe = asyncio.Event()
        probing = asyncio.create_task(probe.run("before", stop_probe))
        await asyncio.sleep(args.steady)
        stop_probe.set()
        await probing
        before = await fleet.counts()
        before_metrics = await asyncio.to_thread(cp.scrape)
        result["connected_before_kill"] = sum(s["connected"] for s in before)
        result["received_before_kill"] = before_metrics.get(
            "sentinel_telemetry_samples_received_total"
        )

        # 2. SIGKILL; the agents lose their sessions and keep producing into their spools.
        killed_at = time.monotonic()
        cp.kill()
        print(f"  [{label}] control plane killed; restarting in {args.down:g} s", flush=True)
        await asyncio.sleep(args.down)
        at_restart = await fleet.counts()
        produced_at_restart = await fleet.produced()
        result["connected_at_restart"] = sum(s["connected"] for s in at_restart)

        # 3. Restart on the same port and store; measure the storm.
        restarted_at = time.monotonic()
        cp_cpu_before = 0.0
        await cp.start()
        listening_at = time.monotonic()
        result["restart_to_listening_s"] = listening_at - restarted_at
        cp_cpu_before = cp.cpu_s()
        stop_probe = asyncio.Event()
        probing = asyncio.create_task(probe.run("storm", stop_probe))
        all_connected_at: float | None = None
        caught_up_at: float | None = None
        deadline = restarted_at + args.storm_timeout
        last_poll = 0.0
        behind: tuple[int, int] = (args.agents, 0)
        connected_now = 0
        while time.monotonic() < deadline:
            counts = await fleet.counts()
            connected_now = sum(s["connected"] for s in counts)
            if all_connected_at is None and connected_now == args.agents:
                # Each simulator stamps the moment all of its agents were in session.
                all_connected_at = max(s["all_connected_at"] for s in counts)
            if caught_up_at is None and time.monotonic() - last_poll >= 0.5:
                last_poll = time.monotonic()
                behind = await asyncio.to_thread(marks.behind, produced_at_restart)
                if behind[0] == 0:
                    caught_up_at = last_poll
            now = time.monotonic()
            if (
                all_connected_at is not None
                and caught_up_at is not None
                and now - listening_at >= args.min_storm
            ):
                break
            await asyncio.sleep(0.25)
        storm_end = time.monotonic()
        stop_probe.set()
        await probing
        after = await fleet.counts()
        result["storm_window_s"] = storm_end - listening_at
        assert cp.process is not None
        result["cp_open_fds_at_storm_end"] = len(os.listdir(f"/proc/{cp.process.pid}/fd"))
        result["connected_at_end"] = connected_now
        result["all_connected_from_restart_s"] = (
            None if all_connected_at is None else all_connected_at - restarted_at
        )
        result["all_connected_from_kill_s"] = (
            None if all_connected_at is None else all_connected_at - killed_at
        )
        result["caught_up_from_restart_s"] = (
            None if caught_up_at is None else caught_up_at - restarted_at
        )
        result["not_caught_up"] = {"agents": behind[0], "samples": behind[1]}
        result["cp_core_percent_storm"] = (
            100 * (cp.cpu_s() - cp_cpu_before) / (storm_end - listening_at)
        )
        sim_cpu = sum(a["cpu_s"] for a in after) - sum(a["cpu_s"] for a in at_restart)
        result["simulator_core_percent_storm"] = 100 * sim_cpu / (storm_end - restarted_at)
        result["agent_failures_storm"] = _diff(_sum_failures(after), _sum_failures(at_restart))
        result["agent_attempts_storm"] = sum(a["attempts"] for a in after) - sum(
            a["attempts"] for a in at_restart
        )
        result["sessions_opened_storm"] = sum(a["sessions_opened"] for a in after) - sum(
            a["sessions_opened"] for a in at_restart
        )
        result["samples_resent"] = sum(a["resent"] for a in after)
        result["sessions_lost_in_storm"] = sum(a["streams_lost"] for a in after) - sum(
            a["streams_lost"] for a in at_restart
        )

        # 4. No sample lost: what every agent has produced by now is stored, without a gap.
        produced_final = await fleet.produced()
        final_deadline = time.monotonic() + 2 * args.interval + 10
        final_behind = await asyncio.to_thread(marks.behind, produced_final)
        while final_behind[0] and time.monotonic() < final_deadline:
            await asyncio.sleep(0.5)
            final_behind = await asyncio.to_thread(marks.behind, produced_final)
        _stored, db_gaps = await asyncio.to_thread(marks.read)
        result["final_behind"] = {"agents": final_behind[0], "samples": final_behind[1]}
        result["samples_produced"] = sum(produced_final.values())
        result["db_gap_samples"] = db_gaps
        metrics = await asyncio.to_thread(cp.scrape)
        result["refused"] = {
            m.group(1): int(v)
            for k, v in metrics.items()
            if (m := re.fullmatch(r'sentinel_agent_sessions_refused_total\{reason="(\w+)"\}', k))
        }
        result["gap_samples_metric"] = metrics.get("sentinel_telemetry_gap_samples_total")
        result["duplicate_samples_metric"] = metrics.get(
            "sentinel_telemetry_duplicate_samples_total"
        )
        result["sessions_opened_metric"] = metrics.get("sentinel_agent_sessions_opened_total")
        result["agents_connected_metric"] = metrics.get('sentinel_agents{status="connected"}')
        for phase in ("before", "storm"):
            for call in ("ListAgents", "SubmitPlan"):
                result[f"{call}_{phase}"] = probe.figures(phase, call)
    finally:
        stopped: list[Message] = []
        with contextlib.suppress(Exception):
            stopped = await fleet.stop()
        cp.stop()
        marks.close()
    total_cpu = sum(s["cpu_s"] for s in stopped)
    result["simulator_cpu_s_total"] = total_cpu
    result["agent_errors"] = sorted({e for s in stopped for e in s["errors"]})[:8]
    result["controlplane_log"] = log_summary(log_path)
    return result


# -- report -----------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _latency(figures: dict[str, Any]) -> str:
    if figures["p50_ms"] is None:
        return f"- ({figures['failed']}/{figures['calls']} failed)"
    text_ = f"{figures['p50_ms']:.0f}/{figures['p99_ms']:.0f}/{figures['max_ms']:.0f}"
    return text_ + (f" ({figures['failed']} failed)" if figures["failed"] else "")


def report(results: list[Message], args: argparse.Namespace) -> None:
    labels = [r["label"] for r in results]
    width = max(24, *(len(label) + 2 for label in labels))
    print()
    print(
        f"Storm: {args.agents} agents, telemetry every {args.interval:g} s, SIGKILL after "
        f"{args.steady:g} s steady, restart {args.down:g} s later, {args.simulators} simulator "
        "process(es)"
    )
    print(f"  {'':44}" + "".join(f"{label:>{width}}" for label in labels))

    def row(title: str, cell: Any) -> None:
        print(f"  {title:44}" + "".join(f"{cell(r):>{width}}" for r in results))

    row("max_opening_sessions", lambda r: str(r["max_opening_sessions"] or "off (0)"))
    row("first connect of all agents (s)", lambda r: _s(r["initial_connect_s"]))
    row(
        "connected before kill / at restart",
        lambda r: f"{r['connected_before_kill']} / {r['connected_at_restart']}",
    )
    row("restart -> listening (s)", lambda r: _s(r["restart_to_listening_s"]))
    row("all connected again, from restart (s)", lambda r: _s(r["all_connected_from_restart_s"]))
    row("  from the kill (s)", lambda r: _s(r["all_connected_from_kill_s"]))
    row("all telemetry stored, from restart (s)", lambda r: _s(r["caught_up_from_restart_s"]))
    row("refused: admission", lambda r: str(r["refused"].get("admission", 0)))
    row("refused: capacity", lambda r: str(r["refused"].get("capacity", 0)))
    row(
        "refused: other reasons",
        lambda r: str(
            sum(v for k, v in r["refused"].items() if k not in ("admission", "capacity"))
        ),
    )
    row("agents' attempts in the storm", lambda r: str(r["agent_attempts_storm"]))
    row(
        "  told to retry later (retry-after)",
        lambda r: str(sum(v for k, v in r["agent_failures_storm"].items() if "retry-after" in k)),
    )
    row(
        "  failed otherwise",
        lambda r: str(
            sum(v for k, v in r["agent_failures_storm"].items() if "retry-after" not in k)
        ),
    )
    row(
        "sessions opened (metric, new process)",
        lambda r: _s(r["sessions_opened_metric"]).removesuffix(".0"),
    )
    row(
        "samples re-sent / duplicates dropped",
        lambda r: f"{r['samples_resent']} / {_s(r['duplicate_samples_metric']).removesuffix('.0')}",
    )
    row(
        "gap samples (metric / stored)",
        lambda r: f"{_s(r['gap_samples_metric']).removesuffix('.0')} / {r['db_gap_samples']}",
    )
    row(
        "agents behind their last sample at end",
        lambda r: f"{r['final_behind']['agents']} ({r['final_behind']['samples']} samples)",
    )
    row("ListAgents ms p50/p99/max, before", lambda r: _latency(r["ListAgents_before"]))
    row("ListAgents ms p50/p99/max, storm", lambda r: _latency(r["ListAgents_storm"]))
    row("SubmitPlan ms p50/p99/max, before", lambda r: _latency(r["SubmitPlan_before"]))
    row("SubmitPlan ms p50/p99/max, storm", lambda r: _latency(r["SubmitPlan_storm"]))
    row(
        "operator calls in the storm",
        lambda r: str(r["ListAgents_storm"]["calls"] + r["SubmitPlan_storm"]["calls"]),
    )
    row("storm window (s)", lambda r: _s(r["storm_window_s"]))
    row("control plane open fds at storm end", lambda r: str(r["cp_open_fds_at_storm_end"]))
    row("control plane CPU in storm (% core)", lambda r: f"{r['cp_core_percent_storm']:.0f}")
    row("simulators' CPU in storm (% core)", lambda r: f"{r['simulator_core_percent_storm']:.0f}")
    row("simulators' CPU, whole run (s)", lambda r: f"{r['simulator_cpu_s_total']:.0f}")
    row(
        "control plane log: warnings / errors",
        lambda r: f"{r['controlplane_log']['warnings']} / {r['controlplane_log']['errors']}",
    )
    print("Goals")
    for r in results:
        back = r["all_connected_from_restart_s"]
        lost = r["final_behind"]["agents"] or (r["gap_samples_metric"] or 0) or r["db_gap_samples"]
        storm_failed = r["ListAgents_storm"]["failed"] + r["SubmitPlan_storm"]["failed"]
        print(
            f"  {r['label']}: all back within {GOAL_BACK_S:.0f} s: "
            f"{'met' if back is not None and back <= GOAL_BACK_S else 'NOT met'}; "
            f"zero samples lost: {'met' if not lost else 'NOT met'}; "
            f"operator calls answered throughout: {'met' if not storm_failed else 'NOT met'}"
        )
    for r in results:
        if r["agent_failures_storm"]:
            print(
                f"  {r['label']} agents' failed attempts in the storm: {r['agent_failures_storm']}"
            )
        for call in ("ListAgents", "SubmitPlan"):
            for failure in r[f"{call}_storm"]["failures"]:
                print(f"  {r['label']} {call} failure: {failure}")
        log = r["controlplane_log"]
        for kind, count in list(log["kinds"].items())[:4]:
            print(f"  {r['label']} control plane logged {count} x {kind}")


async def main_async(args: argparse.Namespace, work_dir: pathlib.Path) -> list[Message]:
    modes = [args.max_opening_sessions]
    if args.compare:
        modes.append(0 if args.max_opening_sessions else 512)
    results = []
    for max_opening in modes:
        label = f"admission {max_opening}" if max_opening else "admission off"
        print(f"run: {label}", flush=True)
        results.append(await run_storm(args, work_dir, max_opening, label.replace(" ", "-")))
    for r in results:
        r["label"] = r["label"].replace("-", " ")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    per_process = math.ceil(args.agents / args.simulators) + 1024
    if fd_limit < args.agents + 1024 or fd_limit < per_process:
        print(f"warning: RLIMIT_NOFILE is {fd_limit}; {args.agents} agents need about "
              f"{args.agents + 1024} in the control plane")  # fmt: skip
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="sentinel-storm-"))
    started = time.monotonic()
    try:
        issue_certificates(work_dir, args.agents)
        print(
            f"{args.agents} agent certificates issued in {time.monotonic() - started:.1f} s "
            f"({work_dir}); {args.simulators} simulator process(es)",
            flush=True,
        )
        results = asyncio.run(main_async(args, work_dir))
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    report(results, args)
    print(f"total run time {time.monotonic() - started:.0f} s")
    if args.json is not None:
        document = {
            "arguments": {
                k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
            },
            "runs": results,
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
