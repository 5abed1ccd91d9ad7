"""The shipped programs as an operator runs them: `sentinel-controlplane` and `sentinel-agent`
as real processes, JSON logs, the agent's own /metrics, and a clean SIGTERM shutdown."""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Pki


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def _nvidia_driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_controlplane_and_agent_processes_log_json_serve_metrics_and_stop_cleanly(
    pki: Pki, tmp_path: Path, database_url: str
) -> None:
    pki.client("agent", "proc-node")
    port, cp_metrics, agent_metrics = _free_port(), _free_port(), _free_port()
    cp_log, agent_log = tmp_path / "cp.log", tmp_path / "agent.log"
    bin_dir = Path(sys.executable).parent
    with cp_log.open("w") as cp_out, agent_log.open("w") as agent_out:
        control_plane = subprocess.Popen(
            [
                str(bin_dir / "sentinel-controlplane"),
                "--certs-dir",
                str(pki.directory),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{cp_metrics}",
                "--enrollment-listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=cp_out,
        )
        agent = subprocess.Popen(
            [
                str(bin_dir / "sentinel-agent"),
                "--node-id",
                "proc-node",
                "--certs-dir",
                str(pki.directory),
                "--control-plane",
                f"localhost:{port}",
                "--state-dir",
                str(tmp_path / "agent-state"),
                "--metrics-listen",
                f"127.0.0.1:{agent_metrics}",
                "--telemetry-interval-s",
                "0.5",
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=agent_out,
        )
        try:
            connected = "sentinel_agent_connected{}"
            _wait_for(lambda: _metrics(agent_metrics).get(connected) == 1.0)
            agent_values = _wait_for(
                lambda: (v := _metrics(agent_metrics)).get("node_load1{}") is not None and v
            )
            states = {
                key: value
                for key, value in agent_values.items()
                if key.startswith("sentinel_agent_gpu_collection_state{")
            }
            # The real NVML in a real process: exactly one state holds, and without a driver
            # it is no_gpu (what a GPU machine reports is test_gpu_collector's real-NVML test).
            assert sorted(states.values()) == [0.0] * (len(states) - 1) + [1.0]
            if not _nvidia_driver_present():
                assert states['sentinel_agent_gpu_collection_state{"state": "no_gpu"}'] == 1.0
            assert agent_values["node_memory_MemTotal_bytes{}"] > 0
            cp_values = _wait_for(
                lambda: (
                    (v := _metrics(cp_metrics)).get(
                        "sentinel_telemetry_samples_received_total{}", 0
                    )
                    > 0
                    and v
                )
            )
            assert cp_values['sentinel_agents{"status": "connected"}'] == 1.0
        finally:
            agent.send_signal(signal.SIGTERM)
            control_plane.send_signal(signal.SIGTERM)
            agent_code = agent.wait(15)
            cp_code = control_plane.wait(15)
    assert (agent_code, cp_code) == (0, 0)

    cp_records = [json.loads(line) for line in cp_log.read_text().splitlines()]
    opened = [r for r in cp_records if r["message"].startswith("agent session opened")]
    assert opened and opened[0]["node_id"] == "proc-node" and opened[0]["session_id"]
    agent_records = [json.loads(line) for line in agent_log.read_text().splitlines()]
    assert any(r.get("node_id") == "proc-node" for r in agent_records)
    everything = cp_log.read_text() + agent_log.read_text()
    assert "PRIVATE KEY" not in everything


def test_missing_certificates_exit_with_a_clear_message(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    for program, args in (
        ("sentinel-controlplane", []),
        ("sentinel-agent", ["--node-id", "node-1"]),
    ):
        done = subprocess.run(
            [str(bin_dir / program), "--certs-dir", str(tmp_path / "nowhere"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, (program, done.stderr)
        assert "does not exist" in done.stderr and "sentinel-certs" in done.stderr
