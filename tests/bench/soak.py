"""Soak benchmark: real node agents and plans flowing against a control plane process for a
given duration, sampling the process's RSS, CPU, open file descriptors, asyncio task count and
the database's size, and reporting each with its least-squares slope per hour.

    python -m tests.bench.soak --duration 1800                 # SQLite in a temp dir
    python -m tests.bench.soak --duration 600 --agents 20 --database-url postgresql+psycopg://...

Not part of the test suite. The control plane runs as its own process (this module's
`--serve` mode: `controlplane.main`'s flags and settings, plus a sampler that writes the
process's asyncio task count to a file every second, since /metrics does not export it).
The agents are real `NodeAgent`s (psutil host collector, no GPU) in this process, one mTLS
connection each. Plans (`set_telemetry_interval` to the interval the agents already use, on two
nodes) are submitted every `--plan-every` seconds and run to COMPLETED; operators' reads
(`ListAgents`, `ListAuditEvents`) come with every sample. Short retentions (`--retention-s`,
pruned every minute) show the database stop growing within the run; `--retention-s 0` keeps
the defaults instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import grpc
from google.protobuf import struct_pb2
from sentinel.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
)
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from certs import CertificateAuthority, Identity, write_private_key

METRICS = ("rss_mib", "cpu_pct", "open_fds", "asyncio_tasks", "db_mib")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pki(directory: pathlib.Path, agents: list[str]) -> None:
    ca = CertificateAuthority.create()
    (directory / "ca.pem").write_bytes(ca.certificate_pem)
    server = ca.issue_server()
    write_private_key(directory / "server.key", server.private_key_pem)
    (directory / "server.pem").write_bytes(server.certificate_pem)
    for role, name in [("planner", "soak"), ("operator", "soak"), *(("agent", a) for a in agents)]:
        issued = ca.issue_client(Identity("sentinel.local", role, name))
        write_private_key(directory / f"{role}-{name}.key", issued.private_key_pem)
        (directory / f"{role}-{name}.pem").write_bytes(issued.certificate_pem)


# -- the server process ---------------------------------------------------------------------


def serve(stats_path: str, argv: list[str]) -> int:
    """The control plane (controlplane.main's flags), plus the asyncio task count in a file."""
    from controlplane import ControlPlane
    from controlplane.main import parse_args
    from processkit import configure_logging

    settings, args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    stats = pathlib.Path(stats_path)

    async def main() -> None:
        control_plane = ControlPlane(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await control_plane.start()
        print(f"listening on port {control_plane.port}", flush=True)
        while not stop.is_set():
            tmp = stats.with_suffix(".tmp")
            tmp.write_text(json.dumps({"tasks": len(asyncio.all_tasks())}))
            tmp.replace(stats)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        await control_plane.stop()

    asyncio.run(main())
    return 0


# -- sampling -------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class DatabaseSize:
    """The store's size on disk: SQLite's file and its WAL, or `pg_database_size`."""

    def __init__(self, url: str) -> None:
        self._sqlite = (
            pathlib.Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite") else None
        )
        self._engine = None if self._sqlite else create_engine(url, poolclass=NullPool)

    def mib(self) -> float:
        if self._sqlite is not None:
            files = [self._sqlite, self._sqlite.with_name(self._sqlite.name + "-wal")]
            return sum(p.stat().st_size for p in files if p.exists()) / 2**20
        assert self._engine is not None
        with self._engine.connect() as db:
            return (
                float(db.scalar(text("SELECT pg_database_size(current_database())")) or 0) / 2**20
            )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600


@dataclasses.dataclass
class Flow:
    """What the driver did: plans submitted and how they ended, sample calls answered."""

    submitted: int = 0
    ended: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: int = 0


# -- the driver -----------------------------------------------------------------------------


def _plan(nodes: list[str], i: int, interval_s: float) -> plan_pb2.SubmitPlanRequest:
    plan = plan_pb2.Plan(source="soak", rationale="soak benchmark", confidence=0.95)
    step = plan.steps.add(step_id="s0", action="set_telemetry_interval")
    for k in range(2):
        step.targets.add(node_id=nodes[(i * 2 + k) % len(nodes)])
    params = struct_pb2.Struct()
    params.update({"seconds": interval_s})
    step.parameters.CopyFrom(params)
    step.timeout.FromSeconds(30)
    plan.limits.max_nodes_in_parallel = 2
    return plan_pb2.SubmitPlanRequest(plan=plan, request_id=f"soak-{uuid.uuid4().hex}")


async def _plans(
    channel: grpc.aio.Channel, nodes: list[str], args: Any, flow: Flow, stop: asyncio.Event
) -> None:
    stub = plan_pb2_grpc.PlanServiceStub(channel)
    pending: dict[str, float] = {}
    i = 0
    while not stop.is_set():
        try:
            response = await stub.SubmitPlan(_plan(nodes, i, args.interval), timeout=10)
            pending[response.plan.plan_id] = time.monotonic()
            flow.submitted += 1
            for plan_id in list(pending):
                got = await stub.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id), timeout=10)
                phase = plan_pb2.PlanPhase.Name(got.plan.phase).removeprefix("PLAN_PHASE_")
                if phase in ("COMPLETED", "FAILED", "ROLLED_BACK", "REJECTED", "CANCELLED"):
                    flow.ended[phase] = flow.ended.get(phase, 0) + 1
                    del pending[plan_id]
        except grpc.aio.AioRpcError as exc:
            flow.errors += 1
            logging.warning("plan call failed: %s %s", exc.code().name, exc.details())
        i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.plan_every)


async def _drive(
    args: Any,
    directory: pathlib.Path,
    port: int,
    server_pid: int,
    stats: pathlib.Path,
    database_url: str,
) -> list[dict[str, float]]:
    from nodeagent.agent import NodeAgent
    from nodeagent.collectors import HostCollector
    from nodeagent.settings import AgentSettings

    nodes = [f"soak-node-{i:03d}" for i in range(args.agents)]
    agents = []
    tasks = []
    for node in nodes:
        settings = AgentSettings(
            node_id=node,
            ca=directory / "ca.pem",
            cert=directory / f"agent-{node}.pem",
            key=directory / f"agent-{node}.key",
            control_plane=f"localhost:{port}",
            state_dir=directory / "agents" / node,
            metrics_listen="",
            telemetry_interval_s=args.interval,
        )
        agent = NodeAgent(settings, host_collector=HostCollector(), gpu_collector=None)
        agents.append(agent)
        tasks.append(asyncio.create_task(agent.run(), name=f"agent-{node}"))
    await asyncio.wait_for(asyncio.gather(*(a.connected.wait() for a in agents)), 60)
    print(f"{len(agents)} agents connected; soaking for {args.duration:g} s", flush=True)

    def credentials(role: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            (directory / "ca.pem").read_bytes(),
            (directory / f"{role}-soak.key").read_bytes(),
            (directory / f"{role}-soak.pem").read_bytes(),
        )

    planner = grpc.aio.secure_channel(f"localhost:{port}", credentials("planner"))
    operator = grpc.aio.secure_channel(f"localhost:{port}", credentials("operator"))
    flow = Flow()
    stop = asyncio.Event()
    plans = asyncio.create_task(_plans(planner, nodes, args, flow, stop))
    size = DatabaseSize(database_url)
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    cpu_before, cpu_at = _cpu_seconds(server_pid), started
    print(f"{'t_s':>6} " + " ".join(f"{m:>13}" for m in METRICS) + f" {'plans':>7}", flush=True)
    try:
        while True:
            await asyncio.sleep(args.sample_every)
            now = time.monotonic()
            cpu = _cpu_seconds(server_pid)
            fleet = fleet_pb2_grpc.FleetServiceStub(operator)
            audit = audit_pb2_grpc.AuditServiceStub(operator)
            try:
                await fleet.ListAgents(fleet_pb2.ListAgentsRequest(), timeout=10)
                await audit.ListAuditEvents(
                    audit_pb2.ListAuditEventsRequest(page_size=50), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                flow.errors += 1
                logging.warning("operator call failed: %s", exc.code().name)
            try:
                task_count = float(json.loads(await asyncio.to_thread(stats.read_text))["tasks"])
            except (OSError, ValueError, KeyError):
                task_count = float("nan")
            sample = {
                "t_s": now - started,
                "rss_mib": _rss_mib(server_pid),
                "cpu_pct": 100 * (cpu - cpu_before) / (now - cpu_at),
                "open_fds": float(len(os.listdir(f"/proc/{server_pid}/fd"))),
                "asyncio_tasks": task_count,
                "db_mib": await asyncio.to_thread(size.mib),
            }
            cpu_before, cpu_at = cpu, now
            samples.append(sample)
            print(
                f"{sample['t_s']:>6.0f} "
                + " ".join(f"{sample[m]:>13.2f}" for m in METRICS)
                + f" {flow.submitted:>7}",
                flush=True,
            )
            if now - started >= args.duration:
                break
    finally:
        stop.set()
        await plans
        await planner.close()
        await operator.close()
        size.close()
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(
        f"plans submitted {flow.submitted}, ended {flow.ended}, failed calls {flow.errors}",
        flush=True,
    )
    return samples


def report(samples: list[dict[str, float]], warmup_s: float) -> None:
    steady = [s for s in samples if s["t_s"] >= warmup_s] or samples
    print(f"\nslopes by least squares over t >= {warmup_s:g} s ({len(steady)} samples)")
    print(f"{'metric':<14}{'first':>10}{'last':>10}{'min':>10}{'max':>10}{'slope/h':>12}")
    for m in METRICS:
        values = [s[m] for s in steady]
        slope = slope_per_hour([(s["t_s"], s[m]) for s in steady])
        print(
            f"{m:<14}{values[0]:>10.2f}{values[-1]:>10.2f}{min(values):>10.2f}"
            f"{max(values):>10.2f}{slope:>+12.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2:])
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=1800, help="seconds of soak")
    parser.add_argument("--agents", type=int, default=20, help="real node agents")
    parser.add_argument("--interval", type=float, default=2.0, help="telemetry interval (s)")
    parser.add_argument("--plan-every", type=float, default=5.0, help="seconds between plans")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds per sample")
    parser.add_argument("--warmup", type=float, default=120.0, help="left out of the slopes (s)")
    parser.add_argument(
        "--retention-s",
        type=float,
        default=300.0,
        help="audit, command and plan retention of the run, pruned every 60 s; 0: defaults",
    )
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    parser.add_argument("--json", default="", help="also write the samples here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="sentinel-soak-") as tmp:
        directory = pathlib.Path(tmp)
        _pki(directory, [f"soak-node-{i:03d}" for i in range(args.agents)])
        database_url = args.database_url or f"sqlite:///{directory / 'soak.db'}"
        stats = directory / "tasks.json"
        port = _free_port()
        retention: list[str] = []
        if args.retention_s > 0:
            for name in ("audit", "commands", "plans", "events"):
                retention += [f"--retention-{name}-s", str(args.retention_s)]
            retention += ["--retention-interval-s", "60"]
        server = subprocess.Popen(
            [
                sys.executable, "-m", "tests.bench.soak", "--serve", str(stats),
                "--certs-dir", str(directory), "--listen", f"127.0.0.1:{port}",
                "--metrics-listen", "", "--enrollment-listen", "",
                "--database-url", database_url, "--log-level", "WARNING", *retention,
            ],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if b"listening" not in line:
                print(f"control plane did not start: {line!r}", file=sys.stderr)
                return 1
            began = dt.datetime.now(dt.UTC)
            samples = asyncio.run(_drive(args, directory, port, server.pid, stats, database_url))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print(f"\nsoak from {began:%Y-%m-%d %H:%M} UTC, {args.agents} agents every {args.interval:g} s,"
          f" a plan every {args.plan_every:g} s, retention {args.retention_s:g} s, "
          f"{database_url.split(':', 1)[0]}")  # fmt: skip
    report(samples, args.warmup)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
