"""What Sentinel really exports, for the tests of the Prometheus rules and Grafana dashboards:
a real `sentinel-controlplane` and a real `sentinel-agent` (on a fake NVIDIA driver, so GPU
metrics exist) run as processes on loopback, their live /metrics are scraped, and the series
names they can produce are compared with the metric names PromQL expressions select.

Run as `python -m tests.deploy._metrics_scrape AGENT-FLAGS...`, this module is the agent
process: it installs the fake driver (tests/fakenvml.py), then runs `sentinel-agent`'s main.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
RULES_FILE = REPO / "deploy" / "prometheus" / "sentinel-rules.yaml"

# Series Prometheus makes itself for every target; no exporter serves them.
PROMETHEUS_SERIES = frozenset({"up"})

_NODE_ID = "scrape-node"
_STARTUP_S = 30.0

# The sample names each metric type always produces, after the family name (the text parser
# strips a counter's `_total`). Optional ones (`_created`) count only where a sample shows them.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
}

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ExportedMetrics:
    """The series names each program's /metrics declares, labelled or not yet observed."""

    control_plane: frozenset[str]
    agent: frozenset[str]

    @property
    def all(self) -> frozenset[str]:
        return self.control_plane | self.agent


def series_names(exposition: str) -> frozenset[str]:
    """Every series name a /metrics text can hold: the samples present, and for each declared
    family (a labelled counter shows only HELP and TYPE until its first increment) the names its
    type produces."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def selected_metrics(expression: str) -> frozenset[str]:
    """The metric names a PromQL expression selects; a selector without a literal name
    (`{__name__=~"..."}`) is refused, since no check could vouch for what it matches."""
    names: set[str] = set()
    nameless: list[str] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                nameless.append(str(node))

    promql_parser.walk(promql_parser.parse(expression), visit)
    if nameless:
        raise ValueError(f"selectors without a metric name in {expression!r}: {nameless}")
    return frozenset(names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _wait_for(
    what: str,
    check: Callable[[], T | None],
    processes: dict[str, subprocess.Popen[bytes]],
    logs: list[Path],
) -> T:
    deadline = time.monotonic() + _STARTUP_S
    problem = f"not within {_STARTUP_S:g} s"
    while time.monotonic() < deadline:
        exited = [name for name, process in processes.items() if process.poll() is not None]
        if exited:
            problem = f"{', '.join(exited)} exited early"
            break
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    raise AssertionError(f"{problem}: {what}\n{tails}")


def _sample_value(exposition: str, name: str) -> float | None:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def _agent_ready(exposition: str) -> str | None:
    # GPU metrics appear with the first sample; connected once the session is open.
    gpus = "DCGM_FI_DEV_GPU_UTIL{" in exposition
    connected = _sample_value(exposition, "sentinel_agent_connected") == 1.0
    return exposition if gpus and connected else None


def _control_plane_ready(exposition: str) -> str | None:
    flushed = _sample_value(exposition, "sentinel_telemetry_flush_seconds_count") or 0.0
    return exposition if flushed > 0 else None


@dataclasses.dataclass
class _Processes:
    running: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    def stop(self) -> None:
        for process in self.running.values():
            process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def scrape_live(certs_dir: Path, work_dir: Path) -> ExportedMetrics:
    """Starts a control plane and one agent with two fake H100s, waits until telemetry flows
    from the agent into the control plane, scrapes both, and stops them. The store is SQLite
    whatever SENTINEL_TEST_DB says: what /metrics declares does not depend on the backend.

    `certs_dir` holds ca.pem, server.pem/key and agent-scrape-node.pem/key (tests' `pki`)."""
    port, cp_metrics, agent_metrics = _free_port(), _free_port(), _free_port()
    cp_log, agent_log = work_dir / "controlplane.log", work_dir / "agent.log"
    bin_dir = Path(sys.executable).parent
    processes = _Processes()
    with cp_log.open("w") as cp_out, agent_log.open("w") as agent_out:
        try:
            processes.running["sentinel-controlplane"] = subprocess.Popen(
                [
                    str(bin_dir / "sentinel-controlplane"),
                    "--certs-dir",
                    str(certs_dir),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--metrics-listen",
                    f"127.0.0.1:{cp_metrics}",
                    "--enrollment-listen",
                    "127.0.0.1:0",
                    "--database-url",
                    f"sqlite:///{work_dir / 'sentinel.db'}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=cp_out,
            )
            processes.running["sentinel-agent"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.deploy._metrics_scrape",
                    "--node-id",
                    _NODE_ID,
                    "--certs-dir",
                    str(certs_dir),
                    "--control-plane",
                    f"localhost:{port}",
                    "--state-dir",
                    str(work_dir / "agent-state"),
                    "--metrics-listen",
                    f"127.0.0.1:{agent_metrics}",
                    "--telemetry-interval-s",
                    "0.5",
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=agent_out,
            )
            logs = [cp_log, agent_log]
            agent_text = _wait_for(
                "the agent serves GPU metrics and is connected",
                lambda: _agent_ready(_fetch(agent_metrics)),
                processes.running,
                logs,
            )
            cp_text = _wait_for(
                "the control plane received and flushed the agent's telemetry",
                lambda: _control_plane_ready(_fetch(cp_metrics)),
                processes.running,
                logs,
            )
        finally:
            processes.stop()
    return ExportedMetrics(control_plane=series_names(cp_text), agent=series_names(agent_text))


_cached: ExportedMetrics | None = None


def exported_metrics(certs_dir: Path, work_dir: Path) -> ExportedMetrics:
    """`scrape_live` once per test session: the rules and the dashboards tests share it."""
    global _cached
    if _cached is None:
        _cached = scrape_live(certs_dir, work_dir)
    return _cached


def _run_agent_on_fake_gpus(argv: list[str]) -> int:
    import pytest

    from nodeagent.main import main
    from tests.fakenvml import FakeNvml, h100

    nvml = FakeNvml([h100(0), h100(1)])
    # A driver that has seen one XID, so the XID metric carries a real value.
    nvml.pending_xids.append((0, 79))
    patch = pytest.MonkeyPatch()
    nvml.install(patch)
    try:
        return main(argv)
    finally:
        patch.undo()


if __name__ == "__main__":
    sys.exit(_run_agent_on_fake_gpus(sys.argv[1:]))
