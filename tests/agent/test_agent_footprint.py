"""What the agent loads: an agent without GPU, /metrics or a certificate to renew carries neither
pynvml, cryptography nor prometheus_client (issue 14: an agent as light as node_exporter)."""

from __future__ import annotations

import ctypes
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import Pki

_PROBE = """
import sys, types, pathlib, asyncio
from nodeagent.main import parse_args
from nodeagent.collectors import AsyncGpuCollector, HostCollector
from nodeagent._certificates import read_certificate

settings, _ = parse_args(["--node-id", "n1", "--certs-dir", sys.argv[1], "--metrics-listen", ""])
current = read_certificate(pathlib.Path(sys.argv[2]))
assert current is not None and current.spiffe_id == "spiffe://sentinel.local/agent/n1"
HostCollector().collect()


async def gpu() -> None:
    collector = AsyncGpuCollector()
    await collector.start()
    await collector.collect()
    await collector.stop()


asyncio.run(gpu())
pynvml = sys.modules.get("pynvml")
print("pynvml", pynvml is not None and type(pynvml) is types.ModuleType)
for name in ("cryptography", "certs", "prometheus_client"):
    print(name, name in sys.modules)
"""


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_an_agent_without_gpu_metrics_or_renewal_loads_no_heavy_module(
    pki: Pki, tmp_path: pathlib.Path
) -> None:
    if _nvml_library_present():
        pytest.skip("this machine has the NVIDIA driver: the agent rightly loads pynvml")
    cert, _key = pki.client("agent", "n1")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(pki.directory), str(cert)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded = dict(line.split() for line in done.stdout.splitlines())
    assert loaded == {
        "pynvml": "False",
        "cryptography": "False",
        "certs": "False",
        "prometheus_client": "False",
    }
