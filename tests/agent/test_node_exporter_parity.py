"""The agent's /metrics against a real node_exporter on the same host: every series both export
(same name, same labels) carries the same value within its family's tolerance, and no series a
dashboard would find in node_exporter is missing from the agent (or the other way round) for the
names the agent claims.

Values move while the two are read, so the agent is read before and after node_exporter and
node_exporter's value must lie between the two agent readings, widened by a per-family slack.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent import encode
from nodeagent.collectors import GpuCollectionState, GpuReading, GpuStatus, HostCollector
from nodeagent.exporter import TelemetryExporter

Key = tuple[str, frozenset[tuple[str, str]]]

_BINARY = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")

pytestmark = pytest.mark.skipif(
    _BINARY is None,
    reason="no node_exporter binary (prometheus-node-exporter or node_exporter) on PATH: "
    "install the Debian package `prometheus-node-exporter` to compare the agent's /metrics "
    "with the real thing",
)

# Every node_exporter name the agent's exporter can render. For each, both sides must have the
# same series; a name neither side has (no PSI on this kernel) is fine.
CLAIMED = frozenset(
    {
        "node_cpu_seconds_total",
        "node_load1",
        "node_load5",
        "node_load15",
        "node_memory_MemTotal_bytes",
        "node_memory_MemAvailable_bytes",
        "node_memory_MemFree_bytes",
        "node_memory_Cached_bytes",
        "node_memory_Buffers_bytes",
        "node_memory_SwapTotal_bytes",
        "node_memory_SwapFree_bytes",
        "node_disk_read_bytes_total",
        "node_disk_written_bytes_total",
        "node_disk_reads_completed_total",
        "node_disk_writes_completed_total",
        "node_disk_io_time_seconds_total",
        "node_filesystem_size_bytes",
        "node_filesystem_free_bytes",
        "node_filesystem_avail_bytes",
        "node_network_receive_bytes_total",
        "node_network_transmit_bytes_total",
        "node_network_receive_packets_total",
        "node_network_transmit_packets_total",
        "node_network_receive_errs_total",
        "node_network_transmit_errs_total",
        "node_network_receive_drop_total",
        "node_network_transmit_drop_total",
        "node_pressure_cpu_waiting_seconds_total",
        "node_pressure_memory_stalled_seconds_total",
        "node_pressure_io_stalled_seconds_total",
        "node_boot_time_seconds",
    }
)

# node_exporter's selection flags set to what the agent follows (upstream node_exporter's
# defaults), since distributions patch some (Debian's package leaves out `lo` and /run, /mnt).
_FILESYSTEM_TYPES_EXCLUDED = (
    "autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|erofs|fusectl|hugetlbfs|"
    "iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|ramfs|rpc_pipefs|securityfs|selinuxfs|"
    "squashfs|sysfs|tracefs"
)
_FLAGS = (
    "--collector.disable-defaults",
    "--collector.cpu",
    "--collector.loadavg",
    "--collector.meminfo",
    "--collector.diskstats",
    "--collector.filesystem",
    "--collector.netdev",
    "--collector.pressure",
    "--collector.stat",
    r"--collector.diskstats.device-exclude=^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$",
    "--collector.netdev.device-exclude=",
    "--collector.filesystem.mount-points-exclude="
    "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)",
    f"--collector.filesystem.fs-types-exclude=^({_FILESYSTEM_TYPES_EXCLUDED})$",
)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far node_exporter's value may lie outside the two agent readings around it."""

    absolute: float = 0.0
    relative: float = 0.0
    """A share of the agent's larger reading."""

    def slack(self, value: float) -> float:
        return self.absolute + self.relative * abs(value)


# By name prefix, most specific first. Counters get no relative slack: they only grow, so the
# bracket alone holds them; what remains is the resolution the kernel reports them in.
TOLERANCES: tuple[tuple[str, Tolerance], ...] = (
    # /proc/stat counts in USER_HZ ticks (1/100 s); both sides divide the same integers, one
    # tick covers a different float rounding.
    ("node_cpu_seconds_total", Tolerance(absolute=0.01)),
    # Whole sectors, operations and bytes: exact. io_time is whole milliseconds.
    ("node_disk_io_time_seconds_total", Tolerance(absolute=0.001)),
    ("node_disk_", Tolerance()),
    # Whole bytes and packets from /proc/net/dev: exact.
    ("node_network_", Tolerance()),
    # PSI totals are whole microseconds.
    ("node_pressure_", Tolerance(absolute=1e-6)),
    # /proc/loadavg has two decimals; the agent's reading (sysinfo) has more.
    ("node_load", Tolerance(absolute=0.01)),
    # Memory gauges go up and down with everything else running on this host, so the bracket
    # does not hold them; 3 % lets that through but not a different quantity (psutil's
    # "cached", which adds reclaimable slab, was 10-15 % above Cached).
    ("node_memory_", Tolerance(absolute=1024 * 1024, relative=0.03)),
    # The size of a mounted filesystem does not change; free space does with other writers.
    ("node_filesystem_size_bytes", Tolerance()),
    ("node_filesystem_", Tolerance(relative=0.01)),
    # btime is whole seconds in /proc/stat.
    ("node_boot_time_seconds", Tolerance(absolute=1.0)),
)


def _tolerance(name: str) -> Tolerance:
    for prefix, tolerance in TOLERANCES:
        if name.startswith(prefix):
            return tolerance
    raise AssertionError(f"no tolerance stated for {name}")


@dataclasses.dataclass(frozen=True)
class Scrape:
    values: dict[Key, float]
    types: dict[str, str]
    """Family name (as the parser names it, without _total) → counter, gauge, ..."""

    def series(self, name: str) -> set[frozenset[tuple[str, str]]]:
        return {labels for series_name, labels in self.values if series_name == name}


def _parse(text: str) -> Scrape:
    values: dict[Key, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(values, types)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The /metrics URL of a node_exporter of our own on a loopback port."""
    assert _BINARY is not None
    log = tmp_path_factory.mktemp("node-exporter") / "node_exporter.log"
    for _attempt in range(3):
        # A port found free can be taken before node_exporter binds it: then it exits.
        port = _free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                [_BINARY, f"--web.listen-address=127.0.0.1:{port}", *_FLAGS],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            if _get(url) is not None:
                try:
                    yield url
                finally:
                    process.terminate()
                    process.wait(10)
                return
            time.sleep(0.05)
        process.kill()
        process.wait(10)
    raise RuntimeError(f"node_exporter would not start:\n{log.read_text()[-3000:]}")


class Agent:
    """The agent's exporter fed as the agent feeds it: a fresh host collection per reading."""

    def __init__(self) -> None:
        self._collector = HostCollector()
        self._registry = CollectorRegistry()
        self._exporter = TelemetryExporter(self._registry)
        self._seq = 0

    def scrape(self) -> Scrape:
        self._seq += 1
        no_gpu = GpuReading(GpuStatus(GpuCollectionState.NO_GPU))
        host = self._collector.collect()
        self._exporter.update(
            encode.telemetry_sample(self._seq, "parity-node", time.time_ns(), host, no_gpu)
        )
        return _parse(generate_latest(self._registry).decode())


def _nodev_filesystem_types() -> set[str]:
    """Filesystem types without a block device (tmpfs, nfs, ...), from /proc/filesystems."""
    try:
        lines = pathlib.Path("/proc/filesystems").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if line.startswith("nodev")}


def _why_only_node_exporter(
    name: str, labels: frozenset[tuple[str, str]], agent: Scrape, nodev: set[str]
) -> str | None:
    """The agent's documented reason to leave out a series node_exporter has, if any."""
    if not name.startswith("node_filesystem_"):
        return None
    label = dict(labels)
    if label.get("fstype") in nodev:
        return "the agent reports filesystems on block devices only (psutil's physical ones)"
    if any(dict(other).get("device") == label.get("device") for other in agent.series(name)):
        return "a bind mount of a device the agent reports once"
    return None


@pytest.fixture
def scrapes(node_exporter: str) -> tuple[Scrape, Scrape, Scrape]:
    """The agent, node_exporter, the agent again, read in that order."""
    agent = Agent()
    before = agent.scrape()
    text = _get(node_exporter)
    assert text is not None, "node_exporter stopped answering"
    real = _parse(text)
    after = agent.scrape()
    return before, real, after


def test_every_shared_series_has_node_exporters_value(
    scrapes: tuple[Scrape, Scrape, Scrape],
) -> None:
    before, real, after = scrapes

    shared = [key for key in before.values if key in real.values and key in after.values]
    disagreements = []
    for key in shared:
        name, labels = key
        low, high = sorted((before.values[key], after.values[key]))
        slack = _tolerance(name).slack(high)
        value = real.values[key]
        if not low - slack <= value <= high + slack:
            disagreements.append(
                f"{name}{dict(labels)}: node_exporter {value!r}, agent {low!r}..{high!r} "
                f"(slack {slack:g})"
            )
    assert not disagreements, "\n".join(disagreements)
    assert {name for name, _ in shared} >= {"node_cpu_seconds_total", "node_memory_Cached_bytes"}


def test_shared_families_have_the_same_type(scrapes: tuple[Scrape, Scrape, Scrape]) -> None:
    before, real, _ = scrapes

    mismatched = {
        family: (kind, real.types[family])
        for family, kind in before.types.items()
        if family in real.types and real.types[family] != kind
    }
    assert not mismatched, f"family: (agent type, node_exporter type): {mismatched}"


def test_no_series_is_missing_on_either_side(scrapes: tuple[Scrape, Scrape, Scrape]) -> None:
    before, real, after = scrapes
    nodev = _nodev_filesystem_types()

    rendered = {name for name, _ in before.values if name.startswith("node_")}
    assert rendered <= CLAIMED, f"the agent renders names this test does not check: {rendered}"
    problems = []
    for name in sorted(CLAIMED):
        # A series that appeared or went away between the agent's two readings (an interface
        # coming up) is in one of them only; either agent reading may stand for the agent.
        agent_series = before.series(name) | after.series(name)
        real_series = real.series(name)
        for labels in agent_series - real_series:
            problems.append(f"only the agent has {name}{dict(labels)}")
        for labels in real_series - agent_series:
            if _why_only_node_exporter(name, labels, before, nodev) is None:
                problems.append(f"only node_exporter has {name}{dict(labels)}")
    assert not problems, "\n".join(problems)


def test_cpu_seconds_are_per_cpu_and_mode(scrapes: tuple[Scrape, Scrape, Scrape]) -> None:
    """The most used node_exporter query, 1 - avg(rate(node_cpu_seconds_total{mode="idle"})),
    needs a series per CPU; one series summed over all CPUs made it negative."""
    before, real, _ = scrapes

    agent_cpus = {dict(labels)["cpu"] for labels in before.series("node_cpu_seconds_total")}
    real_cpus = {dict(labels)["cpu"] for labels in real.series("node_cpu_seconds_total")}
    assert agent_cpus == real_cpus
    assert len(agent_cpus) == len(HostCollector.cpu_seconds_per_cpu())
