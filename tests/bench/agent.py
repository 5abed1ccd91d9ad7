"""Agent benchmark: the real node agent as a process against a real control plane process, its
CPU per collection cycle, RSS and start-up, next to Prometheus' node_exporter's CPU per scrape
and RSS measured in the same run on the same host.

    python -m tests.bench.agent                                 # 60 cycles at 0.5 s, 3 repeats
    python -m tests.bench.agent --cycles 20 --repeats 1         # a quick check
    python -m tests.bench.agent --compare-tree /tmp/before      # also an older agent, alternated

Not part of the test suite. No GPU is needed (NVML absent: the agent runs host-only). The
control plane (`python -m controlplane.main`, SQLite) and every agent get certificates of a
fresh development CA issued into a temporary directory, deleted at the end. Each agent run is a
fresh process with a fresh state directory and its own node id. node_exporter
(`/usr/bin/prometheus-node-exporter`, default collectors) listens on a free loopback port and is
scraped with a plain HTTP client (no gzip) at the same interval as the agent collects.

CPU is read from the process's CPU-time clock (`clock_gettime` on the clock of another process:
user + system of all its threads, dead ones included, in nanoseconds), so short windows are
precise; /proc/PID/stat (10 ms ticks) is the fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from certs import CertificateAuthority, Identity, write_private_key

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
RSS_TARGET_MIB = 40.0
RATIO_TARGET = 0.25
_MIB = 1024 * 1024


@dataclass
class AgentRun:
    """One agent process: start-up, then a steady window of collection cycles."""

    label: str
    startup_s: float
    """Spawn to "session open" (imports, state, TLS, hello, welcome)."""
    startup_cpu_ms: float
    """CPU the process used until then."""
    cycles: int
    cpu_ms_per_cycle: float
    rss_warm_mib: float
    """VmRSS at the start of the window (after the warm-up cycles)."""
    rss_end_mib: float
    pss_end_mib: float
    uss_end_mib: float
    hwm_mib: float
    """Peak RSS (VmHWM) over the whole run, start-up included."""
    threads: int


@dataclass
class ExporterRun:
    """node_exporter: a steady window of scrapes."""

    scrapes: int
    cpu_ms_per_scrape: float
    scrape_ms_p50: float
    """Wall time of one scrape as the client saw it."""
    rss_mib: float
    pss_mib: float
    uss_mib: float
    series: int
    body_bytes: int


# -- process measurement ------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process has used."""
    try:
        # The kernel's CPU-time clock of another process (what clock_getcpuclockid returns):
        # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED).
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0])
    return values


def _memory(pid: int) -> dict[str, float]:
    """RSS, PSS, USS (private clean + dirty), peak RSS, in MiB; and the thread count."""
    status = _status_kib(pid)
    rollup: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                rollup[parts[0][:-1]] = int(parts[1])
    return {
        "rss": status.get("VmRSS", 0) / 1024,
        "hwm": status.get("VmHWM", 0) / 1024,
        "pss": rollup.get("Pss", 0) / 1024,
        "uss": (rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)) / 1024,
        "threads": status.get("Threads", 0),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the control plane and the PKI -------------------------------------------------------------


class Pki:
    """A development CA in the temporary directory; issues one agent identity per run."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self._ca = CertificateAuthority.create()
        (directory / "ca.pem").write_bytes(self._ca.certificate_pem)
        server = self._ca.issue_server()
        write_private_key(directory / "server.key", server.private_key_pem)
        (directory / "server.pem").write_bytes(server.certificate_pem)
        self._issued = 0

    def new_agent(self) -> str:
        self._issued += 1
        node_id = f"bench-agent-{self._issued:03d}"
        client = self._ca.issue_client(Identity("sentinel.local", "agent", node_id))
        write_private_key(self.directory / f"agent-{node_id}.key", client.private_key_pem)
        (self.directory / f"agent-{node_id}.pem").write_bytes(client.certificate_pem)
        return node_id


@contextlib.contextmanager
def control_plane(directory: pathlib.Path, interval_s: float) -> Iterator[int]:
    """A control plane process on a free port (SQLite in `directory`); yields the port."""
    port = _free_port()
    log = (directory / "controlplane.log").open("wb")
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
            "",
            "--enrollment-listen",
            "",
            "--database-url",
            f"sqlite:///{directory / 'controlplane.db'}",
            "--telemetry-interval-s",
            str(interval_s),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if b"listening" not in line:
            raise SystemExit(f"control plane did not start: {line!r} (see its log)")
        yield port
    finally:
        _stop(server)
        log.close()


# -- the agent -----------------------------------------------------------------------------------


def _next_seq(db: pathlib.Path) -> int:
    """The seq the agent's next sample will carry, read from its state database: one past the
    newest spooled sample, or the stored counter (older agents store it with every sample)."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        (newest,) = connection.execute("SELECT MAX(seq) FROM spool").fetchone()
        row = connection.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    finally:
        connection.close()
    return max(int(newest or 0) + 1, int(row[0]) if row else 1)


def _wait_for_seq(db: pathlib.Path, at_least: int, deadline: float) -> int:
    """Polls until the agent has spooled up to `at_least - 1`; returns its next seq."""
    while True:
        with contextlib.suppress(sqlite3.Error):
            seq = _next_seq(db)
            if seq >= at_least:
                return seq
        if time.monotonic() > deadline:
            raise SystemExit(f"the agent did not reach seq {at_least} in time")
        time.sleep(0.005)


def measure_agent(
    args: argparse.Namespace,
    directory: pathlib.Path,
    pki: Pki,
    port: int,
    label: str,
    tree: pathlib.Path | None,
) -> AgentRun:
    """Runs one agent process through start-up, warm-up and `args.cycles` cycles."""
    node_id = pki.new_agent()
    state_dir = directory / f"state-{node_id}"
    log_path = directory / f"{node_id}.log"
    env = dict(os.environ)
    cwd: pathlib.Path | None = None
    if tree is not None:
        # An older checkout's nodeagent package: first on the path, and the working directory
        # (python -m puts it first) is that tree, not this one.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
        cwd = tree
    metrics = f"127.0.0.1:{_free_port()}" if args.agent_metrics else ""
    command = [
        sys.executable,
        "-m",
        "nodeagent.main",
        "--node-id",
        node_id,
        "--certs-dir",
        str(directory),
        "--control-plane",
        f"localhost:{port}",
        "--state-dir",
        str(state_dir),
        "--metrics-listen",
        metrics,
        "--telemetry-interval-s",
        str(args.interval),
        "--log-level",
        "INFO",
    ]
    with log_path.open("wb") as log:
        started = time.monotonic()
        agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = started + 60
        while b"session open" not in log_path.read_bytes():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent did not open a session:\n{log_path.read_text()}")
            time.sleep(0.005)
        startup_s = time.monotonic() - started
        startup_cpu = _cpu_s(agent.pid)
        db = state_dir / "agent.db"
        # Window boundaries right after a sample is spooled, so both are at the same phase.
        first = _wait_for_seq(db, 1 + args.warmup, time.monotonic() + 60)
        begin_seq = _wait_for_seq(db, first + 1, time.monotonic() + 60)
        cpu_begin = _cpu_s(agent.pid)
        warm = _memory(agent.pid)
        # Out of the agent's way (and the machine's) until the window is nearly over; then
        # polled closely, so the end is right after a sample too.
        time.sleep(max(0.0, (args.cycles - 2) * args.interval))
        end_seq = _wait_for_seq(
            db, begin_seq + args.cycles, time.monotonic() + args.cycles * args.interval * 3 + 30
        )
        cpu_end = _cpu_s(agent.pid)
        end = _memory(agent.pid)
        if agent.poll() is not None:
            raise SystemExit(f"agent exited:\n{log_path.read_text()}")
    finally:
        _stop(agent)
    cycles = end_seq - begin_seq
    return AgentRun(
        label=label,
        startup_s=startup_s,
        startup_cpu_ms=startup_cpu * 1000,
        cycles=cycles,
        cpu_ms_per_cycle=(cpu_end - cpu_begin) * 1000 / cycles,
        rss_warm_mib=warm["rss"],
        rss_end_mib=end["rss"],
        pss_end_mib=end["pss"],
        uss_end_mib=end["uss"],
        hwm_mib=end["hwm"],
        threads=int(end["threads"]),
    )


# -- node_exporter ---------------------------------------------------------------------------


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body


def measure_node_exporter(args: argparse.Namespace) -> ExporterRun:
    """Starts node_exporter, scrapes it `args.warmup` then `args.cycles` times at the interval."""
    port = _free_port()
    exporter = subprocess.Popen(
        [args.node_exporter, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _scrape(url)
                break
            except OSError:
                if exporter.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("node_exporter did not start") from None
                time.sleep(0.05)
        for _ in range(args.warmup):
            _scrape(url)
            time.sleep(args.interval)
        durations: list[float] = []
        body = b""
        cpu_begin = _cpu_s(exporter.pid)
        next_start = time.monotonic()
        for _ in range(args.cycles):
            started = time.monotonic()
            body = _scrape(url)
            durations.append(time.monotonic() - started)
            next_start += args.interval
            time.sleep(max(0.0, next_start - time.monotonic()))
        cpu_end = _cpu_s(exporter.pid)
        memory = _memory(exporter.pid)
    finally:
        _stop(exporter)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return ExporterRun(
        scrapes=args.cycles,
        cpu_ms_per_scrape=(cpu_end - cpu_begin) * 1000 / args.cycles,
        scrape_ms_p50=statistics.median(durations) * 1000,
        rss_mib=memory["rss"],
        pss_mib=memory["pss"],
        uss_mib=memory["uss"],
        series=series,
        body_bytes=len(body),
    )


# -- the report ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _judge(met: bool) -> str:
    return "met" if met else "NOT met"


def report(agents: dict[str, list[AgentRun]], exporters: list[ExporterRun]) -> dict[str, Any]:
    """Prints the table (medians over repeats) and returns the summary."""
    exporter_cpu = _median([e.cpu_ms_per_scrape for e in exporters])
    summary: dict[str, Any] = {
        "node_exporter": {
            "cpu_ms_per_scrape": exporter_cpu,
            "scrape_ms_p50": _median([e.scrape_ms_p50 for e in exporters]),
            "rss_mib": _median([e.rss_mib for e in exporters]),
            "pss_mib": _median([e.pss_mib for e in exporters]),
            "uss_mib": _median([e.uss_mib for e in exporters]),
            "series": int(_median([float(e.series) for e in exporters])),
        },
        "agents": {},
    }
    ne = summary["node_exporter"]
    print(f"\n{'medians of ' + str(len(exporters)) + ' repeats':<44}", end="")
    labels = list(agents)
    print("".join(f"{label:>16}" for label in labels))

    def row(name: str, values: list[str]) -> None:
        print(f"  {name:<42}" + "".join(f"{v:>16}" for v in values))

    per_label: dict[str, dict[str, float]] = {}
    for label, runs in agents.items():
        # Each repeat's ratio uses the node_exporter figure of the same repeat.
        ratios = [
            run.cpu_ms_per_cycle / exporter.cpu_ms_per_scrape
            for run, exporter in zip(runs, exporters, strict=False)
        ]
        per_label[label] = {
            "startup_s": _median([r.startup_s for r in runs]),
            "startup_cpu_ms": _median([r.startup_cpu_ms for r in runs]),
            "cpu_ms_per_cycle": _median([r.cpu_ms_per_cycle for r in runs]),
            "ratio": _median(ratios),
            "rss_warm_mib": _median([r.rss_warm_mib for r in runs]),
            "rss_end_mib": _median([r.rss_end_mib for r in runs]),
            "pss_end_mib": _median([r.pss_end_mib for r in runs]),
            "uss_end_mib": _median([r.uss_end_mib for r in runs]),
            "hwm_mib": _median([r.hwm_mib for r in runs]),
            "threads": _median([float(r.threads) for r in runs]),
        }
    summary["agents"] = per_label
    figures = [
        ("agent start-up to session open (s)", "startup_s", "{:.2f}"),
        ("agent start-up CPU (ms)", "startup_cpu_ms", "{:.0f}"),
        ("agent CPU per cycle (ms)", "cpu_ms_per_cycle", "{:.3f}"),
        ("agent RSS after warm-up (MiB)", "rss_warm_mib", "{:.1f}"),
        ("agent RSS at end (MiB)", "rss_end_mib", "{:.1f}"),
        ("agent PSS / USS at end (MiB)", "", ""),
        ("agent peak RSS (MiB)", "hwm_mib", "{:.1f}"),
        ("agent threads", "threads", "{:.0f}"),
        ("CPU per cycle / node_exporter per scrape", "ratio", "{:.3f}"),
    ]
    for name, key, fmt in figures:
        if not key:
            row(
                name,
                [f"{v['pss_end_mib']:.1f} / {v['uss_end_mib']:.1f}" for v in per_label.values()],
            )
        else:
            row(name, [fmt.format(v[key]) for v in per_label.values()])
    row(
        f"target: RSS at end <= {RSS_TARGET_MIB:.0f} MiB",
        [_judge(v["rss_end_mib"] <= RSS_TARGET_MIB) for v in per_label.values()],
    )
    row(
        f"target: CPU ratio <= {RATIO_TARGET}",
        [_judge(v["ratio"] <= RATIO_TARGET) for v in per_label.values()],
    )
    print(
        f"  node_exporter: {ne['cpu_ms_per_scrape']:.3f} ms CPU per scrape "
        f"({ne['scrape_ms_p50']:.1f} ms per scrape p50), {ne['series']} series, "
        f"RSS {ne['rss_mib']:.1f} MiB (PSS {ne['pss_mib']:.1f}, USS {ne['uss_mib']:.1f})"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=60, help="cycles (scrapes) per window")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between cycles")
    parser.add_argument("--warmup", type=int, default=10, help="cycles before the window")
    parser.add_argument("--repeats", type=int, default=3, help="measurements (medians shown)")
    parser.add_argument("--json", default="", help="also write every figure here")
    parser.add_argument(
        "--compare-tree",
        default="",
        help="a directory holding another `nodeagent` package (e.g. a checkout of an older "
        "commit): measured too, in alternating order",
    )
    parser.add_argument(
        "--no-agent-metrics",
        dest="agent_metrics",
        action="store_false",
        help="run the agent without its own /metrics endpoint (on by default, as shipped)",
    )
    parser.add_argument("--node-exporter", default=NODE_EXPORTER)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if not shutil.which(args.node_exporter):
        raise SystemExit(f"{args.node_exporter} not found (Debian: prometheus-node-exporter)")
    trees: dict[str, pathlib.Path | None] = {"agent": None}
    if args.compare_tree:
        trees["compare"] = pathlib.Path(args.compare_tree).resolve()
    directory = pathlib.Path(tempfile.mkdtemp(prefix="sentinel-bench-agent-"))
    agents: dict[str, list[AgentRun]] = {label: [] for label in trees}
    exporters: list[ExporterRun] = []
    try:
        pki = Pki(directory)
        with control_plane(directory, args.interval) as port:
            for repeat in range(args.repeats):
                order: list[str] = ["node_exporter", *trees]
                # Rotate, so no contender always runs first (or right after another).
                order = order[repeat % len(order) :] + order[: repeat % len(order)]
                for what in order:
                    if what == "node_exporter":
                        exporter = measure_node_exporter(args)
                        exporters.append(exporter)
                        print(f"repeat {repeat + 1} node_exporter: {exporter}", flush=True)
                    else:
                        run = measure_agent(args, directory, pki, port, what, trees[what])
                        agents[what].append(run)
                        print(f"repeat {repeat + 1} {what}: {run}", flush=True)
        summary = report(agents, exporters)
        if args.json:
            pathlib.Path(args.json).write_text(
                json.dumps(
                    {
                        "settings": vars(args),
                        "summary": summary,
                        "node_exporter": [asdict(e) for e in exporters],
                        "agents": {k: [asdict(r) for r in v] for k, v in agents.items()},
                    },
                    indent=2,
                )
            )
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
