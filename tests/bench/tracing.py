"""Tracing benchmark: what turning tracing on costs the control plane, measured in one run with
tracing off and on, alternating, each in a fresh control plane process.

    python -m tests.bench.tracing [--agents 300] [--window 20] [--plans 300] [--repeats 2]

For each mode the control plane process (`python -m controlplane.main`, SQLite in a temp dir,
an approval policy so plans are stored but not executed) serves a simulated fleet (the fleet
benchmark's simulator: real mTLS sessions, ~2.5 KB samples every `--interval` seconds), and:

1. **telemetry**: its CPU time (from /proc) over `--window` seconds divided by the telemetry
   messages it received (its `sentinel_telemetry_samples_received_total`): CPU µs per message;
2. **SubmitPlan**: `--plans` submissions (2 steps over 5 of the simulated nodes each, 8 in
   flight) while the fleet goes on sending: calls per second and CPU ms per call.

With tracing on, spans are sampled as the SDK's default says (parent-based, always on) and
exported with OTLP/gRPC, batched, to a collector in this process that counts them (so the
export's serialization and sending are in the figures). See docs/tracing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from sentinel.v1 import plan_pb2, plan_pb2_grpc

from certs import CertificateAuthority, Identity, write_private_key
from tests.bench import _messages
from tests.bench._ipc import raise_fd_limit, receive
from tests.bench._simulator import SimulatorConfig, simulator_process_main
from tests.bench.plans import APPROVAL_POLICY, _closed_loop, _cpu_seconds, _free_port, _request

TRUST_DOMAIN = "sentinel.local"
RECEIVED = re.compile(rb"^sentinel_telemetry_samples_received_total (\S+)$", re.MULTILINE)


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that only counts the spans it receives."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _pki(directory: pathlib.Path, agents: int) -> None:
    ca = CertificateAuthority.create("Sentinel tracing benchmark CA")
    (directory / "ca.pem").write_bytes(ca.certificate_pem)
    server = ca.issue_server()
    (directory / "server.pem").write_bytes(server.certificate_pem)
    write_private_key(directory / "server.key", server.private_key_pem)
    planner = ca.issue_client(Identity(TRUST_DOMAIN, "planner", "bench"))
    (directory / "planner.pem").write_bytes(planner.certificate_pem)
    write_private_key(directory / "planner.key", planner.private_key_pem)
    for index in range(1, agents + 1):
        node = _messages.node_id(index)
        issued = ca.issue_client(Identity(TRUST_DOMAIN, "agent", node))
        (directory / f"{node}.pem").write_bytes(issued.certificate_pem)
        write_private_key(directory / f"{node}.key", issued.private_key_pem)


def _received(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        found = RECEIVED.search(r.read())
    return float(found.group(1)) if found else 0.0


def _start_server(
    directory: pathlib.Path, run: int, tracing: bool, collector_port: int
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics_port = _free_port(), _free_port()
    environment = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_SERVICE_NAME": "sentinel-bench",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.main",
            "--certs-dir",
            str(directory),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--enrollment-listen",
            "",
            "--database-url",
            f"sqlite:///{directory / f'bench-{run}.db'}",
            "--policy-paths",
            str(directory / "policy.yaml"),
            "--log-level",
            "WARNING",
            "--tracing",
            "otlp" if tracing else "off",
        ],
        stdout=subprocess.PIPE,
        env=environment,
    )
    return server, port, metrics_port


async def _measure(
    directory: pathlib.Path, run: int, tracing: bool, collector: _Collector, collector_port: int
) -> dict[str, float]:
    args = ARGS
    server, port, metrics_port = _start_server(directory, run, tracing, collector_port)
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    simulator = context.Process(
        target=simulator_process_main,
        args=(
            SimulatorConfig(
                target=f"127.0.0.1:{port}",
                cert_dir=str(directory),
                first_index=1,
                count=args.agents,
                interval_s=args.interval,
                ramp=100,
            ),
            child_end,
        ),
        daemon=True,
    )
    try:
        assert server.stdout is not None
        line = await asyncio.to_thread(server.stdout.readline)
        if b"listening" not in line:
            raise RuntimeError(f"control plane did not start: {line!r}")
        simulator.start()
        child_end.close()
        connected = await receive(parent_end, 300)
        if connected.get("welcomed") != args.agents:
            raise RuntimeError(f"simulator: {connected}")
        await asyncio.sleep(args.interval * 2)  # every agent past its first sends

        spans_before = collector.spans
        cpu, messages, started = _cpu_seconds(server.pid), _received(metrics_port), time.time()
        await asyncio.sleep(args.window)
        cpu_used = _cpu_seconds(server.pid) - cpu
        received = _received(metrics_port) - messages
        elapsed = time.time() - started
        telemetry_spans = collector.spans - spans_before

        nodes = [_messages.node_id(i) for i in range(1, args.agents + 1)]
        credentials = grpc.ssl_channel_credentials(
            (directory / "ca.pem").read_bytes(),
            (directory / "planner.key").read_bytes(),
            (directory / "planner.pem").read_bytes(),
        )
        channels = [grpc.aio.secure_channel(f"localhost:{port}", credentials) for _ in range(2)]

        async def submit(stub: plan_pb2_grpc.PlanServiceStub, i: int) -> None:
            reply = await stub.SubmitPlan(_request(nodes, i))
            assert reply.plan.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL, reply.plan

        try:
            await _closed_loop(channels, 50, 8, submit)  # warm-up
            cpu = _cpu_seconds(server.pid)
            _, wall = await _closed_loop(channels, args.plans, 8, submit)
            submit_cpu = _cpu_seconds(server.pid) - cpu
        finally:
            for channel in channels:
                await channel.close()
        parent_end.send({"type": "stop"})
        await receive(parent_end, 120)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(server.wait, 30)
        except subprocess.TimeoutExpired:
            print("  (the control plane did not stop within 30 s: killed)", flush=True)
            server.kill()
        simulator.join(30)
    await asyncio.sleep(0.5)
    return {
        "messages_per_s": received / elapsed,
        "cpu_us_per_message": cpu_used / received * 1e6 if received else float("nan"),
        "spans_during_telemetry": telemetry_spans,
        "submit_per_s": args.plans / wall,
        "cpu_ms_per_submit": submit_cpu / args.plans * 1000,
    }


async def _run(directory: pathlib.Path) -> dict[str, list[dict[str, float]]]:
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    collector_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        run = 0
        for _ in range(ARGS.repeats):
            for mode in ("off", "on"):
                run += 1
                spans = collector.spans
                figures = await _measure(directory, run, mode == "on", collector, collector_port)
                figures["spans_exported"] = collector.spans - spans
                results[mode].append(figures)
                print(
                    f"  run {run} tracing {mode:<3}: "
                    f"{figures['cpu_us_per_message']:.1f} µs CPU/message "
                    f"({figures['messages_per_s']:.0f} msg/s), "
                    f"{figures['submit_per_s']:.0f} SubmitPlan/s, "
                    f"{figures['cpu_ms_per_submit']:.2f} ms CPU/SubmitPlan, "
                    f"{figures['spans_exported']:.0f} spans exported",
                    flush=True,
                )
    finally:
        await server.stop(0)
    return results


ARGS: argparse.Namespace


def main(argv: list[str] | None = None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracing", description=__doc__)
    parser.add_argument("--agents", type=int, default=300, help="simulated agents")
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval, s")
    parser.add_argument("--window", type=float, default=20.0, help="telemetry CPU window, s")
    parser.add_argument("--plans", type=int, default=300, help="SubmitPlan calls per mode")
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs (medians shown)")
    ARGS = parser.parse_args(argv)
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="sentinel-bench-tracing-") as tmp:
        directory = pathlib.Path(tmp)
        _pki(directory, ARGS.agents)
        (directory / "policy.yaml").write_text(APPROVAL_POLICY)
        results = asyncio.run(_run(directory))

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    print(
        f"\ntracing benchmark: {ARGS.agents} agents every {ARGS.interval:g} s, "
        f"{ARGS.window:g} s window, {ARGS.plans} SubmitPlan calls, {ARGS.repeats} pairs (medians)"
    )
    print(f"{'':<28}{'off':>10}{'on':>10}{'on/off':>9}")
    for key, label in (
        ("cpu_us_per_message", "CPU µs per telemetry msg"),
        ("spans_during_telemetry", "spans in telemetry window"),
        ("submit_per_s", "SubmitPlan per s"),
        ("cpu_ms_per_submit", "CPU ms per SubmitPlan"),
    ):
        off, on = median("off", key), median("on", key)
        ratio = f"{on / off:>9.3f}" if off else f"{'':>9}"
        print(f"{label:<28}{off:>10.2f}{on:>10.2f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
