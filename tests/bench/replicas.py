"""Replicas benchmark: what acting as one control plane on PostgreSQL costs.

For each replica count (`--replicas 2,3`), in one run, on a throwaway PostgreSQL started here:

1. command round trip through replica A for agents held by replica B (cross) against through B
   itself (same), interleaved, and the difference;
2. telemetry delivery to one StreamTelemetry subscriber on A for nodes held by B;
3. how the agents spread over the replicas behind a round-robin L4 proxy;
4. database load (statements and transactions per second per 1,000 agents) and each replica's
   CPU per telemetry message at a steady telemetry interval.

Each replica is a process of its own (a `ControlPlane` driven over a pipe), so its CPU time is
its own; the agents are the fleet benchmark's simulator (another process). Not part of pytest.

    python -m tests.bench.replicas
    python -m tests.bench.replicas --replicas 2 --agents 100 --window 10 --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import ModuleType
from typing import Any

import grpc
from sentinel.v1 import telemetry_pb2, telemetry_pb2_grpc
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from certs import CertificateAuthority, Identity, write_private_key
from tests.bench import _messages
from tests.bench._ipc import Message, percentile, raise_fd_limit, receive
from tests.bench._simulator import SimulatorConfig, simulator_process_main

TRUST_DOMAIN = "sentinel.local"
TELEMETRY_COUNTER = "sentinel_telemetry_samples_received_total"
REPO = pathlib.Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.replicas", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--replicas", default="2,3", help="replica counts to measure (2,3)")
    parser.add_argument("--agents", type=int, default=200, help="simulated agents (200)")
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval s (1)")
    parser.add_argument("--window", type=float, default=20.0, help="steady window s (20)")
    parser.add_argument("--commands", type=int, default=200, help="pings per path (200)")
    parser.add_argument("--command-spacing", type=float, default=0.01, help="s between pings")
    parser.add_argument("--subscribed-nodes", type=int, default=20, help="nodes streamed (20)")
    parser.add_argument("--stream-window", type=float, default=10.0, help="stream s (10)")
    parser.add_argument("--database-url", default="", help="use this server, do not start one")
    parser.add_argument("--no-fsync", action="store_true", help="fsync/synchronous_commit off")
    parser.add_argument("--json", type=pathlib.Path, help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.replica_counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    if any(n < 2 for n in args.replica_counts):
        parser.error("--replicas: each count must be at least 2 (A and B)")
    if args.agents < args.replica_counts[-1] or args.window <= 0 or args.interval <= 0:
        parser.error("--agents must cover every replica; --window and --interval positive")
    return args


# -- PKI ---------------------------------------------------------------------------------------


def issue_certificates(directory: pathlib.Path, agents: int) -> None:
    """A fresh CA (its key next to ca.pem, as the control plane expects), a loopback server
    certificate, one client certificate per agent and one for the telemetry subscriber."""
    ca = CertificateAuthority.create("Sentinel benchmark CA")
    (directory / "ca.pem").write_bytes(ca.certificate_pem)
    write_private_key(directory / "ca.key", ca.private_key_pem)
    server = ca.issue_server()
    (directory / "server.pem").write_bytes(server.certificate_pem)
    write_private_key(directory / "server.key", server.private_key_pem)
    names = [("agent", _messages.node_id(i)) for i in range(1, agents + 1)]
    for role, name in [*names, ("operator", "bench")]:
        issued = ca.issue_client(Identity(TRUST_DOMAIN, role, name))
        (directory / f"{name}.pem").write_bytes(issued.certificate_pem)
        write_private_key(directory / f"{name}.key", issued.private_key_pem)


# -- PostgreSQL --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> pathlib.Path:
    explicit = os.environ.get("PG_BIN", "")
    if explicit and (pathlib.Path(explicit) / "initdb").exists():
        return pathlib.Path(explicit)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return pathlib.Path(found).parent
    candidates = sorted(
        pathlib.Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
    )
    for candidate in reversed(candidates):
        if (candidate / "initdb").exists():
            return candidate
    raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) not found; set PG_BIN")


class Postgres:
    """A private server in a temporary directory (as scripts/test.sh starts one), run as
    `postgres` (or `nobody`) through runuser when we are root."""

    def __init__(self, fsync: bool) -> None:
        self.fsync = fsync
        self.bin = _pg_bin()
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="sentinel-bench-pg."))
        self.user = ""
        if os.geteuid() == 0:
            self.user = "postgres"
            if subprocess.run(["id", "-u", "postgres"], capture_output=True).returncode:
                self.user = "nobody"
            shutil.chown(self.dir, self.user)
        self.dir.chmod(0o700)
        self.url = ""
        self.stat_statements = False

    def _run(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        command = list(argv)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, cwd=self.dir, capture_output=True)

    def start(self) -> None:
        data = str(self.dir / "data")
        done = self._run(
            str(self.bin / "initdb"),
            "-D",
            data,
            "-U",
            "sentinel",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode:
            raise RuntimeError(f"initdb failed:\n{done.stdout.decode()}{done.stderr.decode()}")
        durability = (
            ""
            if self.fsync
            else (" -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        )
        for preload in (True, False):
            port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={self.dir}"
                f" -c max_connections=300{durability}"
            )
            if preload:
                options += " -c shared_preload_libraries=pg_stat_statements"
            started = self._run(
                str(self.bin / "pg_ctl"),
                "-D",
                data,
                "-l",
                str(self.dir / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            )
            if started.returncode == 0:
                self.url = f"postgresql+psycopg://sentinel@127.0.0.1:{port}/postgres"
                self.stat_statements = preload
                return
        log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start:\n{log}")

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"
            )
        shutil.rmtree(self.dir, ignore_errors=True)


class DatabaseStats:
    """Readings of pg_stat_database and pg_stat_statements for one database, taken from the
    maintenance database (so the readings do not count against the one measured)."""

    def __init__(self, admin_url: str) -> None:
        self.engine: Engine = create_engine(
            admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        self.statements = False
        with self.engine.connect() as db, contextlib.suppress(Exception):
            db.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            db.execute(text("SELECT count(*) FROM pg_stat_statements"))
            self.statements = True

    def create(self, name: str) -> str:
        with self.engine.connect() as db:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            db.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
        return self.engine.url.set(database=name).render_as_string(hide_password=False)

    def snapshot(self, name: str) -> Message:
        with self.engine.connect() as db:
            row = db.execute(
                text(
                    "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted"
                    " FROM pg_stat_database WHERE datname = :n"
                ),
                {"n": name},
            ).one()
            snap: Message = {
                "at": time.monotonic(),
                "xact_commit": int(row[0]),
                "xact_rollback": int(row[1]),
                "tup_inserted": int(row[2]),
                "tup_updated": int(row[3]),
                "tup_deleted": int(row[4]),
                "statements": {},
            }
            if self.statements:
                rows = db.execute(
                    text(
                        "SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 100), s.calls"
                        " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                        " WHERE d.datname = :n"
                    ),
                    {"n": name},
                )
                statements: dict[str, int] = {}
                for query, calls in rows:
                    statements[str(query)] = statements.get(str(query), 0) + int(calls)
                snap["statements"] = statements
            return snap

    def drop(self, name: str) -> None:
        with self.engine.connect() as db:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- one replica, in a process of its own ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    replica_id: str
    database_url: str
    cert_dir: str
    interval_s: float


class _Replica:
    """The control plane and what the benchmark asks of it."""

    def __init__(self, config: ReplicaConfig, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        self.cp: Any = None
        self.sql_statements = 0
        self.stamp_nodes: frozenset[str] = frozenset()
        self.stamps: dict[str, float] = {}

    async def run(self) -> None:
        from sqlalchemy import event

        from controlplane import ControlPlane, ControlPlaneSettings, TlsFiles

        directory = pathlib.Path(self.config.cert_dir)
        settings = ControlPlaneSettings(
            listen="127.0.0.1:0",
            metrics_listen="",
            enrollment_listen="",
            database_url=self.config.database_url,
            controller_id=self.config.replica_id,
            tls=TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key"),
            telemetry_interval_s=self.config.interval_s,
        )
        self.cp = cp = ControlPlane(settings)
        await cp.start()

        def counted(*_args: object) -> None:
            self.sql_statements += 1

        event.listen(cp.store._engine, "before_cursor_execute", counted)
        # The hub calls `relay.forward` with every batch right after offering it to its own
        # subscribers (its on_published): the moment a sample is published on this replica.
        forward = cp.relay.forward

        def stamped(samples: list[Any]) -> None:
            now = time.monotonic()
            for sample in samples:
                if sample.node_id in self.stamp_nodes:
                    self.stamps[f"{sample.node_id}/{sample.seq}"] = now
            forward(samples)

        cp.relay.forward = stamped  # type: ignore[method-assign]
        self.conn.send({"type": "ready", "port": cp.port})
        try:
            await self.serve()
        finally:
            await cp.stop()

    def _received(self) -> float:
        value = self.cp.metrics_registry.get_sample_value(TELEMETRY_COUNTER)
        return float(value or 0.0)

    async def serve(self) -> None:
        cp = self.cp
        while True:
            request = await receive(self.conn)
            kind = request["type"]
            if kind == "info":
                own = cp.registry.replica_id
                held = [
                    a.node_id
                    for a in cp.registry.agents()
                    if cp.registry.holder_of(a.node_id) == own
                ]
                holders: dict[str, int] = {}
                for agent in cp.registry.agents():
                    holder = cp.registry.holder_of(agent.node_id) or ""
                    holders[holder] = holders.get(holder, 0) + 1
                reply: Message = {
                    "held": held,
                    "holders": holders,
                    "others": sorted(cp.replicas.others()),
                }
            elif kind == "snapshot":
                reply = {
                    "at": time.monotonic(),
                    "cpu_s": time.process_time(),
                    "received": self._received(),
                    "sql_statements": self.sql_statements,
                    "relayed_out": cp.relay.relayed_out,
                    "relayed_in": cp.relay.relayed_in,
                }
            elif kind == "ping":
                started = time.monotonic()
                try:
                    result = await cp.commands.send(request["node"], "ping", {}, timeout=10.0)
                    error = "" if result.outcome == "SUCCEEDED" else str(result.outcome)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                reply = {"ms": (time.monotonic() - started) * 1000, "error": error}
            elif kind == "stamp":
                self.stamp_nodes = frozenset(request["nodes"])
                self.stamps = {}
                reply = {}
            elif kind == "stamps":
                reply = {"stamps": dict(self.stamps)}
                self.stamp_nodes = frozenset()
            elif kind == "stop":
                self.conn.send({"type": "stopped"})
                return
            else:
                reply = {"error": f"unknown request {kind!r}"}
            self.conn.send({"type": kind, **reply})


def replica_process_main(config: ReplicaConfig, conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"{config.replica_id}: %(message)s")
    try:
        asyncio.run(_Replica(config, conn).run())
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise


# -- the orchestration -------------------------------------------------------------------------


@dataclass(slots=True)
class _Child:
    name: str
    process: BaseProcess
    conn: Connection
    port: int = 0

    async def ask(self, message: Message, timeout: float = 60.0) -> Message:
        self.conn.send(message)
        reply = await receive(self.conn, timeout)
        if reply["type"] == "error":
            raise RuntimeError(f"{self.name}: {reply['message']}")
        return reply


def _spawn(name: str, target: Any, config: Any) -> _Child:
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=target, args=(config, child_end), name=name)
    process.start()
    child_end.close()
    return _Child(name, process, parent_end)


def _load_l4proxy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("l4proxy", REPO / "scripts" / "l4proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _p(values: list[float], p: float) -> float | None:
    return round(percentile(values, p), 2) if values else None


async def _wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def measure(args: argparse.Namespace, count: int, stats: DatabaseStats, work: str) -> Message:
    """Everything for one replica count, on a fresh database."""
    name = f"bench_replicas_{count}"
    url = stats.create(name)
    replicas: list[_Child] = []
    simulator: _Child | None = None
    proxy_server: asyncio.Server | None = None
    proxy: Any = None
    result: Message = {"replicas": count, "agents": args.agents, "interval_s": args.interval}
    try:
        for number in range(1, count + 1):
            rid = f"replica-{number}"
            replicas.append(
                _spawn(rid, replica_process_main, ReplicaConfig(rid, url, work, args.interval))
            )
        for replica in replicas:
            ready = await receive(replica.conn, 120)
            if ready["type"] != "ready":
                raise RuntimeError(f"{replica.name}: {ready.get('message', ready)}")
            replica.port = int(ready["port"])

        async def all_see_each_other() -> bool:
            infos = [await r.ask({"type": "info"}) for r in replicas]
            return all(len(i["others"]) == count - 1 for i in infos)

        await _wait_for(all_see_each_other, 60, "the replicas to see each other")

        # (3) agents through the round-robin L4 proxy
        l4proxy = _load_l4proxy()
        proxy_server, proxy = await l4proxy.start(
            ("127.0.0.1", 0), [("127.0.0.1", r.port) for r in replicas]
        )
        assert proxy_server is not None
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        simulator = _spawn(
            "simulator",
            simulator_process_main,
            SimulatorConfig(
                target=f"localhost:{proxy_port}",
                cert_dir=work,
                first_index=1,
                count=args.agents,
                interval_s=args.interval,
                ramp=50,
                connect_timeout_s=120,
            ),
        )
        connected = await receive(simulator.conn, 180)
        if connected["type"] != "connected" or connected["welcomed"] != args.agents:
            raise RuntimeError(f"agents did not all connect: {connected}")
        result["connect_all_s"] = round(connected["all_welcome"] - connected["first_attempt"], 2)
        result["connect_failed_attempts"] = connected["failed_attempts"]

        async def directory_complete() -> bool:
            infos = [await r.ask({"type": "info"}) for r in replicas]
            return (
                all(
                    i["holders"].get(r.name, 0) == len(infos[k]["held"])
                    for i in infos
                    for k, r in enumerate(replicas)
                )
                and sum(len(i["held"]) for i in infos) == args.agents
            )

        await _wait_for(directory_complete, 60, "every replica's directory to agree")
        infos = [await r.ask({"type": "info"}) for r in replicas]
        held = {r.name: len(i["held"]) for r, i in zip(replicas, infos, strict=True)}
        result["held"] = held
        result["proxy_connections"] = list(proxy.connections)
        await asyncio.sleep(2 * args.interval)  # every agent past its first sample

        # (4) steady window: database load and each replica's CPU per telemetry message
        before_db = await asyncio.to_thread(stats.snapshot, name)
        before = [await r.ask({"type": "snapshot"}) for r in replicas]
        sent_before = (await simulator.ask({"type": "count"}))["sent"]
        await asyncio.sleep(args.window)
        after = [await r.ask({"type": "snapshot"}) for r in replicas]
        sent_after = (await simulator.ask({"type": "count"}))["sent"]
        after_db = await asyncio.to_thread(stats.snapshot, name)
        wall = after_db["at"] - before_db["at"]
        per_k = 1000 / args.agents
        commits = after_db["xact_commit"] - before_db["xact_commit"]
        db: Message = {
            "window_s": round(wall, 2),
            "xact_commit_per_s": round(commits / wall, 1),
            "xact_commit_per_s_per_1000_agents": round(commits / wall * per_k, 1),
            "tup_updated_per_s": round(
                (after_db["tup_updated"] - before_db["tup_updated"]) / wall, 1
            ),
            "tup_inserted_per_s": round(
                (after_db["tup_inserted"] - before_db["tup_inserted"]) / wall, 1
            ),
            "telemetry_sent_per_s": round((sent_after - sent_before) / wall, 1),
        }
        sql = sum(
            a["sql_statements"] - b["sql_statements"] for a, b in zip(after, before, strict=True)
        )
        db["sqlalchemy_statements_per_s"] = round(sql / wall, 1)
        db["sqlalchemy_statements_per_s_per_1000_agents"] = round(sql / wall * per_k, 1)
        if stats.statements:
            deltas = {
                q: c - before_db["statements"].get(q, 0) for q, c in after_db["statements"].items()
            }
            calls = sum(deltas.values())
            db["pg_statements_per_s"] = round(calls / wall, 1)
            db["pg_statements_per_s_per_1000_agents"] = round(calls / wall * per_k, 1)
            top = sorted(deltas.items(), key=lambda kv: -kv[1])[:8]
            db["top_statements_per_s"] = {q: round(c / wall, 1) for q, c in top if c}
        result["database"] = db
        cpu: Message = {}
        for replica, b, a in zip(replicas, before, after, strict=True):
            seconds = a["at"] - b["at"]
            used = a["cpu_s"] - b["cpu_s"]
            messages = a["received"] - b["received"]
            cpu[replica.name] = {
                "cpu_pct_core": round(100 * used / seconds, 1),
                "messages_per_s": round(messages / seconds, 1),
                "cpu_us_per_message": round(1e6 * used / messages, 1) if messages else None,
                "relay_notifies_per_s": round((a["relayed_out"] - b["relayed_out"]) / seconds, 2),
            }
        result["cpu"] = cpu

        # (1) commands: through A (cross) and through B (same) to B's agents, interleaved
        a_rep, b_rep = replicas[0], replicas[1]
        b_nodes = sorted((await b_rep.ask({"type": "info"}))["held"])
        cross: list[float] = []
        same: list[float] = []
        errors: list[str] = []
        for i in range(args.commands):
            node = b_nodes[i % len(b_nodes)]
            order = [(a_rep, cross), (b_rep, same)]
            for replica, into in order if i % 2 == 0 else order[::-1]:
                reply = await replica.ask({"type": "ping", "node": node})
                if reply["error"]:
                    errors.append(f"{replica.name}: {reply['error']}")
                else:
                    into.append(reply["ms"])
                await asyncio.sleep(args.command_spacing)
        result["commands"] = {
            "sent_per_path": args.commands,
            "cross_p50_ms": _p(cross, 50),
            "cross_p99_ms": _p(cross, 99),
            "same_p50_ms": _p(same, 50),
            "same_p99_ms": _p(same, 99),
            "added_p50_ms": _sub(_p(cross, 50), _p(same, 50)),
            "added_p99_ms": _sub(_p(cross, 99), _p(same, 99)),
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:5],
            "cross_ms": [round(x, 2) for x in cross],
            "same_ms": [round(x, 2) for x in same],
        }

        # (2) telemetry: one subscriber on A for nodes held by B
        nodes = b_nodes[: args.subscribed_nodes]
        await b_rep.ask({"type": "stamp", "nodes": nodes})
        result["telemetry"] = await _stream(args, work, a_rep.port, nodes, b_rep)
    finally:
        if simulator is not None:
            with contextlib.suppress(Exception):
                await simulator.ask({"type": "stop"}, 60)
        if proxy is not None:
            await proxy.close_connections()
        if proxy_server is not None:
            proxy_server.close()
        for replica in replicas:
            with contextlib.suppress(Exception):
                await replica.ask({"type": "stop"}, 30)
        for child in [*replicas, *([simulator] if simulator else [])]:
            child.process.join(10)
            if child.process.is_alive():
                child.process.terminate()
                child.process.join()
        await asyncio.to_thread(stats.drop, name)
    return result


def _sub(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else round(x - y, 2)


async def _stream(
    args: argparse.Namespace, work: str, port: int, nodes: list[str], holder: _Child
) -> Message:
    directory = pathlib.Path(work)
    credentials = grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(),
        (directory / "bench.key").read_bytes(),
        (directory / "bench.pem").read_bytes(),
    )
    received: list[tuple[str, float, float]] = []
    opened = time.monotonic()
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        call = stub.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(node_ids=nodes))

        async def read() -> None:
            async for message in call:
                sample = message.sample
                at, wall = time.monotonic(), time.time()
                collected = sample.collect_time.ToNanoseconds() / 1e9
                received.append((f"{sample.node_id}/{sample.seq}", at, wall - collected))

        reader = asyncio.create_task(read())
        await asyncio.sleep(args.stream_window)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader
    stamps: dict[str, float] = (await holder.ask({"type": "stamps"}))["stamps"]
    # The first second is the interest reaching the holder; from then on, the steady path.
    steady = [r for r in received if r[1] > opened + 1.0]
    published = [1000 * (at - stamps[key]) for key, at, _ in steady if key in stamps]
    collected = [1000 * age for _, _, age in steady]
    expected = len(nodes) * (args.stream_window - 1.0) / args.interval
    return {
        "nodes": len(nodes),
        "received": len(steady),
        "expected_about": round(expected),
        "matched_to_publish": len(published),
        "publish_to_receive_p50_ms": _p(published, 50),
        "publish_to_receive_p99_ms": _p(published, 99),
        "collect_to_receive_p50_ms": _p(collected, 50),
        "collect_to_receive_p99_ms": _p(collected, 99),
    }


# -- the report --------------------------------------------------------------------------------


def _f(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def _pairs(figures: list[Message], first: str, second: str, unit: str = "") -> Iterator[str]:
    return (f"{_f(f[first])} / {_f(f[second])}{unit}" for f in figures)


def report(results: list[Message], fsync: bool, stat_statements: bool) -> None:
    print()
    print(
        f"Replicas benchmark: {results[0]['agents']} agents, telemetry every "
        f"{results[0]['interval_s']:g} s, PostgreSQL fsync {'on' if fsync else 'off'}"
    )
    heads = [f"{r['replicas']} replicas" for r in results]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: Iterator[str]) -> None:
        rows.append((label, list(values)))

    cmd = [r["commands"] for r in results]
    tel = [r["telemetry"] for r in results]
    dbs = [r["database"] for r in results]
    cpu = [list(r["cpu"].values()) for r in results]
    row("cmd same-replica p50 / p99", _pairs(cmd, "same_p50_ms", "same_p99_ms", " ms"))
    row("cmd cross-replica p50 / p99", _pairs(cmd, "cross_p50_ms", "cross_p99_ms", " ms"))
    row(
        "cmd added p50 / p99 (target p99 <= 100)",
        _pairs(cmd, "added_p50_ms", "added_p99_ms", " ms"),
    )
    row("cmd errors", (str(c["errors"]) for c in cmd))
    row(
        "tel B publish -> A subscriber p50 / p99",
        _pairs(tel, "publish_to_receive_p50_ms", "publish_to_receive_p99_ms", " ms"),
    )
    row(
        "tel collect_time -> A subscriber p50 / p99",
        _pairs(tel, "collect_to_receive_p50_ms", "collect_to_receive_p99_ms", " ms"),
    )
    row("tel samples received / expected", _pairs(tel, "received", "expected_about"))
    row("agents held per replica", (" / ".join(map(str, r["held"].values())) for r in results))
    row("connect all (s)", (_f(r["connect_all_s"]) for r in results))
    row("db commits/s", (_f(d["xact_commit_per_s"]) for d in dbs))
    row("db commits/s per 1,000 agents", (_f(d["xact_commit_per_s_per_1000_agents"]) for d in dbs))
    if stat_statements:
        row(
            "db statements/s per 1,000 (pg_stat_statements)",
            (_f(d.get("pg_statements_per_s_per_1000_agents")) for d in dbs),
        )
    row(
        "db statements/s per 1,000 (SQLAlchemy)",
        (_f(d["sqlalchemy_statements_per_s_per_1000_agents"]) for d in dbs),
    )
    row("db rows updated/s", (_f(d["tup_updated_per_s"]) for d in dbs))
    row("telemetry msgs/s (sent)", (_f(d["telemetry_sent_per_s"]) for d in dbs))
    row("replica CPU % of a core", (" / ".join(_f(c["cpu_pct_core"]) for c in r) for r in cpu))
    row(
        "replica CPU us per message",
        (" / ".join(_f(c["cpu_us_per_message"]) for c in r) for r in cpu),
    )
    row(
        "relay NOTIFY payloads/s sent per replica",
        (" / ".join(_f(c["relay_notifies_per_s"]) for c in r) for r in cpu),
    )
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(h), *(len(v[i]) for _, v in rows)) + 2 for i, h in enumerate(heads)]
    print("".ljust(width) + "".join(h.ljust(c) for h, c in zip(heads, cols, strict=True)))
    for label, values in rows:
        print(label.ljust(width) + "".join(v.ljust(c) for v, c in zip(values, cols, strict=True)))
    for r in results:
        top = r["database"].get("top_statements_per_s", {})
        if top:
            print(f"\n{r['replicas']} replicas, top statements/s:")
            for query, rate in list(top.items())[:6]:
                print(f"  {rate:8.1f}  {query}")


async def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    work = tempfile.mkdtemp(prefix="sentinel-bench-replicas.")
    postgres: Postgres | None = None
    try:
        print(f"issuing {args.agents + 2} certificates ...", flush=True)
        issue_certificates(pathlib.Path(work), args.agents)
        url = args.database_url
        if not url:
            postgres = Postgres(fsync=not args.no_fsync)
            postgres.start()
            url = postgres.url
            print(f"PostgreSQL at {url} (fsync {'off' if args.no_fsync else 'on'})", flush=True)
        stats = DatabaseStats(url)
        results = []
        for count in args.replica_counts:
            print(f"measuring {count} replicas ...", flush=True)
            started = time.monotonic()
            results.append(await measure(args, count, stats, work))
            print(f"  done in {time.monotonic() - started:.0f} s", flush=True)
        stats.engine.dispose()
        report(results, fsync=not args.no_fsync, stat_statements=stats.statements)
        if args.json:
            summary = {
                "fsync": not args.no_fsync,
                "pg_stat_statements": stats.statements,
                "cpu_count": os.cpu_count(),
                "python": sys.version.split()[0],
                "median_added_p99_ms": statistics.median(
                    r["commands"]["added_p99_ms"]
                    for r in results
                    if r["commands"]["added_p99_ms"] is not None
                )
                if any(r["commands"]["added_p99_ms"] is not None for r in results)
                else None,
                "runs": results,
            }
            args.json.write_text(json.dumps(summary, indent=2))
            print(f"\nJSON written to {args.json}")
        return 0
    finally:
        if postgres is not None:
            postgres.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
