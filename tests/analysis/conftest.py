"""A real Prometheus for gate tests: the distribution's binary on a free loopback port with a
throwaway TSDB, scraping every second an exporter whose values the tests set."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from controlplane.analysis import PrometheusGate

STARTUP_TIMEOUT_S = 20.0
SCRAPE_JOB = "gates"


def free_port() -> int:
    """A loopback port nothing listens on (at the moment of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _query(address: str, query: str) -> Any:
    """The `data.result` of an instant query, or None if Prometheus cannot answer yet."""
    url = f"{address}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())["data"]["result"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class RunningPrometheus:
    """A Prometheus the session started, and the gauges its one scrape target serves."""

    address: str
    value: Gauge
    """`gate_test_value{case=...}`: each test uses its own `case`, so tests do not interfere."""
    deployment_errors: Gauge
    """`gate_deployment_errors{namespace, name, cluster, plan_id}`: for placeholder tests."""

    def gate(self, **fields: Any) -> PrometheusGate:
        """A gate on this Prometheus; quick by default (one measurement, no pause)."""
        defaults: dict[str, Any] = {
            "name": "error-rate",
            "address": self.address,
            "interval_s": 0.0,
            "count": 1,
            "timeout_s": 5.0,
        }
        return PrometheusGate(**(defaults | fields))

    async def set_value(self, case: str, value: float) -> None:
        """Sets `gate_test_value{case=...}` and returns once Prometheus has scraped it."""
        self.value.labels(case=case).set(value)
        await self.wait_until_seen(f'gate_test_value{{case="{case}"}}', value)

    async def wait_until_seen(self, query: str, value: float, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            result = await asyncio.to_thread(_query, self.address, query)
            if result and all(float(sample["value"][1]) == value for sample in result):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus did not see {query} == {value} in {timeout_s} s")
            await asyncio.sleep(0.1)


def _wait_ready(process: subprocess.Popen[bytes], address: str, log: pathlib.Path) -> bool:
    """Whether Prometheus came up ready; False if it exited (e.g. the port was taken)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{address}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"Prometheus not ready in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if pathlib.Path("/usr/bin/prometheus").exists() else None
    )
    if binary is None:
        pytest.skip(
            "no prometheus binary on PATH: install the Debian package `prometheus` "
            "(.ci/run does) to run the gate tests against a real Prometheus"
        )
    registry = CollectorRegistry()
    value = Gauge("gate_test_value", "A value a gate test sets.", ["case"], registry=registry)
    deployment_errors = Gauge(
        "gate_deployment_errors",
        "Errors of a deployment, labelled like a rollout target.",
        ["namespace", "name", "cluster", "plan_id"],
        registry=registry,
    )
    exporter, exporter_thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    directory = tmp_path_factory.mktemp("prometheus")
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {SCRAPE_JOB}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter.server_port}']\n"
    )
    log = directory / "prometheus.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        # A port found free can be taken before Prometheus binds it: then it exits; try again.
        for attempt in range(3):
            port = free_port()
            address = f"http://127.0.0.1:{port}"
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={directory / f'data-{attempt}'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if _wait_ready(process, address, log):
                break
            _stop(process)
        else:
            raise RuntimeError(f"Prometheus would not start:\n{log.read_text()[-3000:]}")
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while _query(address, f'up{{job="{SCRAPE_JOB}"}} == 1') in (None, []):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the exporter was never scraped:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield RunningPrometheus(address, value, deployment_errors)
    finally:
        if process is not None:
            _stop(process)
        exporter.shutdown()
        exporter.server_close()
        exporter_thread.join(5)


@pytest.fixture
def unused_address() -> str:
    """The address of a Prometheus that is not running: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def silent_address() -> Iterator[str]:
    """The address of a server that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
