"""The fleet benchmark: N simulated agents over mTLS against a bare grpc.aio baseline and
against Sentinel's control plane, in one run, with the same simulator and the same messages.

    python -m tests.bench.fleet [--agents 5000] [--window 60] [--only both] [--json out.json]

See tests/bench/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python tests/bench/fleet.py): make `tests.bench` importable, here and in
    # the spawned processes, which inherit sys.path.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from certs import CertificateAuthority, Identity, write_private_key
from tests.bench import _messages
from tests.bench._ipc import Message, raise_fd_limit
from tests.bench._server import RunConfig, server_process_main

TRUST_DOMAIN = "sentinel.local"
KB = 1024  # as /proc's "kB"

# Issue 14's targets (2 cores, 5 s telemetry, host + 8 GPUs). The agent count is what one
# process should hold; the others are judged at whatever count the run used, and were stated
# for 5,000 agents (connect ratio, loop lag) or any fleet size (CPU, RSS).
TARGET_AGENTS = 20000
TARGET_STATED_AT = 5000
TARGET_CPU_RATIO = 1.1
TARGET_RSS_PER_AGENT_KB = 100.0
TARGET_PING_P99_MS = 20.0
TARGET_CONNECT_RATIO = 1.5
TARGET_LOOP_LAG_P99_MS = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.fleet",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--agents", type=int, default=5000, help="simulated agents (default 5000)")
    parser.add_argument(
        "--window", type=float, default=60.0, help="steady-state window, seconds (default 60)"
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="telemetry interval, seconds (default 5)"
    )
    parser.add_argument(
        "--pings",
        type=int,
        default=200,
        help="ping commands sent to Sentinel under steady load (default 200; 0 for none)",
    )
    parser.add_argument(
        "--pings-in-window",
        action="store_true",
        help="send the pings inside the CPU window instead of right after it (their CPU then "
        "counts against telemetry)",
    )
    parser.add_argument(
        "--ping-spacing",
        type=float,
        default=0.05,
        help="seconds between ping starts after the window (default 0.05)",
    )
    parser.add_argument("--only", choices=("baseline", "sentinel", "both"), default="both")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures to this file")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure each server this many times, alternating; the summary takes medians",
    )
    parser.add_argument(
        "--ramp",
        type=int,
        default=250,
        help="connection attempts (TLS handshake + hello) in flight at once (default 250)",
    )
    parser.add_argument(
        "--simulators",
        type=int,
        default=0,
        help="simulator processes (default: one per 2,500 agents)",
    )
    parser.add_argument(
        "--slices", type=int, default=6, help="window slices measured separately (default 6)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=600.0,
        help="seconds the fleet may take to connect (default 600)",
    )
    parser.add_argument(
        "--grpc-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra gRPC server option for both servers (repeatable; integers as integers)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a control-plane setting for Sentinel's server (repeatable), e.g. "
        "max_opening_sessions=0",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    settings = []
    for setting in args.setting:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            parser.error(f"--setting {setting!r}: expected NAME=VALUE")
        settings.append((name, value))
    args.setting = tuple(settings)
    options: list[tuple[str, int | str]] = []
    for option in args.grpc_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            parser.error(f"--grpc-option {option!r}: expected KEY=VALUE")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    args.grpc_option = tuple(options)
    if args.agents < 1 or args.window <= 0 or args.interval <= 0 or args.repeats < 1:
        parser.error("--agents, --window, --interval and --repeats must be positive")
    if args.simulators == 0:
        args.simulators = max(1, math.ceil(args.agents / 2500))
    return args


def issue_certificates(directory: pathlib.Path, agents: int) -> None:
    """A fresh CA, a loopback server certificate and one client certificate per agent."""
    ca = CertificateAuthority.create("Sentinel benchmark CA")
    (directory / "ca.pem").write_bytes(ca.certificate_pem)
    server = ca.issue_server()
    (directory / "server.pem").write_bytes(server.certificate_pem)
    write_private_key(directory / "server.key", server.private_key_pem)
    for index in range(1, agents + 1):
        node = _messages.node_id(index)
        issued = ca.issue_client(Identity(TRUST_DOMAIN, "agent", node))
        (directory / f"{node}.pem").write_bytes(issued.certificate_pem)
        write_private_key(directory / f"{node}.key", issued.private_key_pem)


def run_one(config: RunConfig) -> Message:
    """Runs one server in a fresh process and returns its figures.

    A fresh process per server keeps the two measurements independent: the second server would
    otherwise start with the first one's freed heap (lowering its RSS growth) and its gRPC state.
    """
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=server_process_main, args=(config, child_end), name=f"bench-{config.kind}"
    )
    process.start()
    child_end.close()
    deadline = time.monotonic() + config.connect_timeout_s + config.window_s + 900
    try:
        while not parent_end.poll(1.0):
            if not process.is_alive():
                raise RuntimeError(f"the {config.kind} process died (exit {process.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {config.kind} measurement did not finish in time")
        message: Message = parent_end.recv()
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
            process.join()
    if message["type"] == "error":
        raise RuntimeError(f"the {config.kind} measurement failed:\n{message['message']}")
    result: Message = message["result"]
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def report_run(result: Message, label: str) -> None:
    agents = result["agents"]
    connect = result["connect_s"]
    print(f"{label}: {agents} agents")
    print(
        f"  connect all      {'timed out' if connect is None else f'{connect:.1f} s'} "
        f"({result['welcomed']}/{agents} welcomed; {result['connect_failed_attempts']} failed "
        f"attempts; per agent p50 {result['connect_p50_s']:.2f} s, "
        f"p99 {result['connect_p99_s']:.2f} s)"
    )
    print(
        f"  steady window    {result['window_s']:.1f} s: {result['messages']:.0f} telemetry "
        f"messages ({result['messages_per_s']:.0f}/s, counted by {result['messages_source']}); "
        f"simulator sent {result['simulator_sent']}, expected "
        f"{result['expected_messages']:.0f}; simulator CPU {result['simulator_core_percent']:.0f} %"
    )
    per_message = result["cpu_us_per_message"]
    slices = result["slice_cpu_us_per_message"]
    spread = f"{min(slices):.0f}-{max(slices):.0f}" if slices else "-"
    print(
        f"  server CPU       {result['cpu_s']:.2f} s = {result['server_core_percent']:.1f} % of "
        f"one core -> {'-' if per_message is None else f'{per_message:.0f}'} us per message "
        f"(slices: median {result['slice_median_cpu_us_per_message'] or 0:.0f}, {spread})"
    )
    print(
        f"  RSS              {result['rss_before_bytes'] / KB**2:.0f} MiB before -> "
        f"{result['rss_after_bytes'] / KB**2:.0f} MiB after = "
        f"{result['rss_per_agent_bytes'] / KB:.1f} KB per agent "
        f"({result['server_threads']} threads)"
    )
    gen2 = result["gc_gen2"]
    print(
        f"  event loop       late by p50 {result['loop_lag_p50_ms']:.1f} ms, "
        f"p99 {result['loop_lag_p99_ms']:.1f} ms, max {result['loop_lag_max_ms']:.0f} ms; "
        f"{gen2['collections']} full GC(s), longest {gen2['max_ms']:.0f} ms"
    )
    if result["pings_sent"]:
        print(
            f"  commands         {result['pings_sent']} pings {result['ping_phase']}: "
            f"p50 {_ms(result['ping_p50_ms'])}, p99 {_ms(result['ping_p99_ms'])}, "
            f"max {_ms(result['ping_max_ms'])}, {result['ping_failed']} failed"
        )
    if result["streams_lost"] or result["open_streams_at_end"] != agents:
        print(
            f"  WARNING          {result['streams_lost']} sessions lost; "
            f"{result['open_streams_at_end']} open at the end of the window"
        )
    if result["messages"] < 0.95 * result["expected_messages"]:
        print("  WARNING          fewer messages than the fleet should send: the simulator or")
        print("                   the server did not keep up; CPU per message is still valid")
    for error in result["errors"]:
        print(f"  error seen       {error}")
    if result["unhandled_server_errors"]:
        print(
            f"  server errors    {result['unhandled_server_errors']} unhandled in the server's "
            "event loop (running, stopping or after), e.g.:"
        )
        for example in result["unhandled_server_error_examples"]:
            print(f"                   {example}")
    for failure in result["ping_failures"]:
        print(f"  ping failure     {failure}")


def _median(results: list[Message], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[Message]], agents: int) -> Message:
    """Medians over repeats, the CPU ratio, and each target judged."""
    figures: dict[str, dict[str, float | None]] = {}
    for kind, results in runs.items():
        figures[kind] = {
            key: _median(results, key)
            for key in (
                "connect_s",
                "cpu_us_per_message",
                "slice_median_cpu_us_per_message",
                "server_core_percent",
                "rss_per_agent_bytes",
                "ping_p50_ms",
                "ping_p99_ms",
                "loop_lag_p99_ms",
                "simulator_core_percent",
            )
        }
    baseline = figures.get("baseline", {}).get("cpu_us_per_message")
    sentinel = figures.get("sentinel", {}).get("cpu_us_per_message")
    ratio = sentinel / baseline if sentinel and baseline else None
    connect_baseline = figures.get("baseline", {}).get("connect_s")
    connect_sentinel = figures.get("sentinel", {}).get("connect_s")
    connect_ratio = (
        connect_sentinel / connect_baseline if connect_sentinel and connect_baseline else None
    )
    lag = figures.get("sentinel", {}).get("loop_lag_p99_ms")

    def verdict(measured: bool, met: bool, value: str) -> dict[str, Any]:
        return {
            "status": ("met" if met else "NOT met") if measured else "not measured",
            "value": value,
        }

    sentinel_runs = runs.get("sentinel", [])
    held = bool(sentinel_runs) and all(
        r["welcomed"] == r["agents"]
        and r["streams_lost"] == 0
        and r["open_streams_at_end"] == r["agents"]
        for r in sentinel_runs
    )
    rss = figures.get("sentinel", {}).get("rss_per_agent_bytes")
    p99 = figures.get("sentinel", {}).get("ping_p99_ms")
    pings_failed = sum(r["ping_failed"] for r in sentinel_runs)
    targets = {
        f"{TARGET_AGENTS:,} agents held": verdict(
            bool(sentinel_runs) and agents >= TARGET_AGENTS,
            held,
            f"{agents} agents"
            + (f", {'all' if held else 'NOT all'} held" if sentinel_runs else ""),
        ),
        f"CPU per message <= {TARGET_CPU_RATIO} x baseline": verdict(
            ratio is not None,
            ratio is not None and ratio <= TARGET_CPU_RATIO,
            "-" if ratio is None else f"{ratio:.2f} x",
        ),
        f"<= {TARGET_RSS_PER_AGENT_KB:.0f} KB RSS per agent": verdict(
            rss is not None,
            rss is not None and rss / KB <= TARGET_RSS_PER_AGENT_KB,
            "-" if rss is None else f"{rss / KB:.1f} KB",
        ),
        f"command round trip p99 <= {TARGET_PING_P99_MS:.0f} ms": verdict(
            p99 is not None,
            p99 is not None and p99 <= TARGET_PING_P99_MS and pings_failed == 0,
            "-" if p99 is None else f"{p99:.1f} ms, {pings_failed} failed",
        ),
        f"time to connect all <= {TARGET_CONNECT_RATIO} x baseline": verdict(
            connect_ratio is not None,
            connect_ratio is not None and connect_ratio <= TARGET_CONNECT_RATIO,
            "-" if connect_ratio is None else f"{connect_ratio:.2f} x",
        ),
        f"event-loop lag p99 <= {TARGET_LOOP_LAG_P99_MS:.0f} ms": verdict(
            lag is not None,
            lag is not None and lag <= TARGET_LOOP_LAG_P99_MS,
            "-" if lag is None else f"{lag:.1f} ms",
        ),
    }
    return {
        "figures": figures,
        "cpu_ratio": ratio,
        "connect_ratio": connect_ratio,
        "targets": targets,
    }


def report_summary(summary: Message, agents: int, window: float, repeats: int) -> None:
    figures = summary["figures"]
    kinds = list(figures)
    print()
    print(f"Summary: {agents} agents, {window:g} s window, median of {repeats} run(s) per server")
    print(f"  {'':28}" + "".join(f"{kind:>14}" for kind in kinds))
    rows: list[tuple[str, str, Callable[[float], str]]] = [
        ("time to connect all (s)", "connect_s", lambda v: f"{v:.1f}"),
        ("CPU us per message", "cpu_us_per_message", lambda v: f"{v:.0f}"),
        ("  (median of slices)", "slice_median_cpu_us_per_message", lambda v: f"{v:.0f}"),
        ("server CPU (% of a core)", "server_core_percent", lambda v: f"{v:.1f}"),
        ("RSS per agent (KB)", "rss_per_agent_bytes", lambda v: f"{v / KB:.1f}"),
        ("ping round trip p50 (ms)", "ping_p50_ms", lambda v: f"{v:.1f}"),
        ("ping round trip p99 (ms)", "ping_p99_ms", lambda v: f"{v:.1f}"),
        ("event-loop lag p99 (ms)", "loop_lag_p99_ms", lambda v: f"{v:.1f}"),
        ("simulators' CPU (% of a core)", "simulator_core_percent", lambda v: f"{v:.0f}"),
    ]
    for title, key, fmt in rows:
        cells = []
        for kind in kinds:
            value = figures[kind][key]
            cells.append(f"{'-' if value is None or math.isnan(value) else fmt(value):>14}")
        print(f"  {title:28}" + "".join(cells))
    if summary["cpu_ratio"] is not None:
        print(f"  CPU per message, sentinel / baseline: {summary['cpu_ratio']:.2f}")
    if summary["connect_ratio"] is not None:
        print(f"  time to connect all, sentinel / baseline: {summary['connect_ratio']:.2f}")
    print(
        "Targets"
        + (
            ""
            if agents >= TARGET_STATED_AT
            else f" (stated for {TARGET_STATED_AT:,} agents and more; "
            "at fewer, fixed costs weigh more per message and per agent)"
        )
    )
    for name, judged in summary["targets"].items():
        print(f"  {name:42} {judged['status']:13} {judged['value']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    needed = args.agents + 1024
    if fd_limit < needed:
        print(f"warning: RLIMIT_NOFILE is {fd_limit}; {args.agents} agents need about {needed}")
    kinds = ["baseline", "sentinel"] if args.only == "both" else [args.only]
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    runs: dict[str, list[Message]] = {kind: [] for kind in kinds}
    try:
        started = time.monotonic()
        issue_certificates(work_dir, args.agents)
        print(
            f"{args.agents} agent certificates issued in {time.monotonic() - started:.1f} s "
            f"({work_dir}); {args.simulators} simulator process(es)"
        )
        # Alternating the servers spreads slow drifts of a shared machine over both.
        for repeat in range(args.repeats):
            for kind in kinds:
                config = RunConfig(
                    kind=kind,
                    agents=args.agents,
                    window_s=args.window,
                    interval_s=args.interval,
                    pings=args.pings,
                    ramp=args.ramp,
                    simulator_processes=args.simulators,
                    slices=args.slices,
                    work_dir=str(work_dir),
                    database=str(work_dir / f"sentinel-{repeat + 1}.db"),
                    connect_timeout_s=args.connect_timeout,
                    pings_in_window=args.pings_in_window,
                    ping_spacing_s=args.ping_spacing,
                    seed=repeat + 1,
                    grpc_options=args.grpc_option,
                    settings=args.setting,
                )
                result = run_one(config)
                runs[kind].append(result)
                report_run(result, f"{kind} (run {repeat + 1}/{args.repeats})")
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary = summarise(runs, args.agents)
    report_summary(summary, args.agents, args.window, args.repeats)
    if args.json is not None:
        document = {
            "arguments": {
                k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
            },
            "runs": runs,
            "summary": summary,
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
