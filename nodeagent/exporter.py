"""The node agent's own HTTP endpoint: Prometheus /metrics with its latest telemetry sample,
rendered with node_exporter names for the host and dcgm-exporter names for GPUs, so existing
dashboards work; and /healthz and /readyz for Kubernetes' probes.

Rendering reads the stored sample (no NVML calls), so a scrape costs little and never waits on a
driver. The one exception is node_cpu_seconds_total: node_exporter has a series per CPU and
mode, the sample carries only their sum, so those are read from /proc/stat at scrape (one read).
"""

from __future__ import annotations

import dataclasses
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sentinel.v1 import telemetry_pb2

from nodeagent.collectors import HostCollector

_MIB = 1024 * 1024

_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

# An idle counter that falls back this far means the CPU was unplugged and came back with fresh
# counters (node_exporter uses the same threshold); smaller drops are the kernel's known jitter
# in idle and iowait, which must not look like a counter reset to rate().
_CPU_RESET_SECONDS = 3.0

_GPU_LABELS = ("gpu", "UUID", "device", "Hostname")


@dataclasses.dataclass(frozen=True)
class _GpuMetric:
    name: str
    documentation: str
    field: str
    convert: Callable[[float], float] = float


# dcgm-exporter's names and units. All are gauges: dcgm-exporter exposes its counters without a
# `_total` suffix, and prometheus_client would add one to a counter family.
_GPU_METRICS = (
    _GpuMetric("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "utilization_gpu_percent"),
    _GpuMetric(
        "DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "utilization_memory_percent"
    ),
    _GpuMetric(
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        "memory_used_bytes",
        lambda value: value // _MIB,
    ),
    _GpuMetric(
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        "memory_free_bytes",
        lambda value: value // _MIB,
    ),
    _GpuMetric(
        "DCGM_FI_DEV_FB_RESERVED",
        "Framebuffer memory reserved (in MiB).",
        "memory_reserved_bytes",
        lambda value: value // _MIB,
    ),
    _GpuMetric(
        "DCGM_FI_DEV_FB_TOTAL",
        "Framebuffer memory total (in MiB).",
        "memory_total_bytes",
        lambda value: value // _MIB,
    ),
    _GpuMetric("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz"),
    _GpuMetric("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "memory_clock_mhz"),
    _GpuMetric("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temperature_celsius"),
    _GpuMetric(
        "DCGM_FI_DEV_POWER_USAGE",
        "Power draw (in W).",
        "power_usage_milliwatts",
        lambda value: value / 1000.0,
    ),
    _GpuMetric(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "Enforced power limit (in W).",
        "power_limit_milliwatts",
        lambda value: value / 1000.0,
    ),
    _GpuMetric(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        "total_energy_millijoules",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "Current clock throttle reasons (bitmask of nvmlClocksEventReason*).",
        "throttle_reasons",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "Total number of single-bit volatile ECC errors.",
        "ecc_corrected_volatile",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Total number of double-bit volatile ECC errors.",
        "ecc_uncorrected_volatile",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for correctable errors.",
        "remapped_rows_correctable",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for uncorrectable errors.",
        "remapped_rows_uncorrectable",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "Whether a row remapping is pending (1) or not (0).",
        "remapped_rows_pending",
    ),
    _GpuMetric(
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered (0 when none).",
        "last_xid",
    ),
    _GpuMetric("DCGM_FI_DEV_FAN_SPEED", "Fan speed (in 0-100%).", "fan_speed_percent"),
    _GpuMetric(
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "PCIe transmit throughput (in KB/s).", "pcie_tx_kbps"
    ),
    _GpuMetric(
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT", "PCIe receive throughput (in KB/s).", "pcie_rx_kbps"
    ),
)

# (metric, help, MemoryTelemetry field), following node_exporter's meminfo collector.
_MEMORY_METRICS = (
    ("node_memory_MemTotal_bytes", "Memory information field MemTotal_bytes.", "total_bytes"),
    (
        "node_memory_MemAvailable_bytes",
        "Memory information field MemAvailable_bytes.",
        "available_bytes",
    ),
    ("node_memory_MemFree_bytes", "Memory information field MemFree_bytes.", "free_bytes"),
    ("node_memory_Cached_bytes", "Memory information field Cached_bytes.", "cached_bytes"),
    ("node_memory_Buffers_bytes", "Memory information field Buffers_bytes.", "buffers_bytes"),
    (
        "node_memory_SwapTotal_bytes",
        "Memory information field SwapTotal_bytes.",
        "swap_total_bytes",
    ),
)

# (metric without _total, help, DiskIoTelemetry field)
_DISK_METRICS = (
    ("node_disk_read_bytes", "The total number of bytes read successfully.", "read_bytes"),
    ("node_disk_written_bytes", "The total number of bytes written successfully.", "written_bytes"),
    (
        "node_disk_reads_completed",
        "The total number of reads completed successfully.",
        "reads_completed",
    ),
    (
        "node_disk_writes_completed",
        "The total number of writes completed successfully.",
        "writes_completed",
    ),
    ("node_disk_io_time_seconds", "Total seconds spent doing I/Os.", "io_time_seconds"),
)

# (metric, help, FilesystemTelemetry field)
_FILESYSTEM_METRICS = (
    ("node_filesystem_size_bytes", "Filesystem size in bytes.", "size_bytes"),
    ("node_filesystem_free_bytes", "Filesystem free space in bytes.", "free_bytes"),
    (
        "node_filesystem_avail_bytes",
        "Filesystem space available to non-root users in bytes.",
        "avail_bytes",
    ),
)

# (metric without _total, help, NetworkTelemetry field)
_NETWORK_METRICS = (
    ("node_network_receive_bytes", "Network device statistic receive_bytes.", "receive_bytes"),
    ("node_network_transmit_bytes", "Network device statistic transmit_bytes.", "transmit_bytes"),
    (
        "node_network_receive_packets",
        "Network device statistic receive_packets.",
        "receive_packets",
    ),
    (
        "node_network_transmit_packets",
        "Network device statistic transmit_packets.",
        "transmit_packets",
    ),
    ("node_network_receive_errs", "Network device statistic receive_errs.", "receive_errors"),
    ("node_network_transmit_errs", "Network device statistic transmit_errs.", "transmit_errors"),
    ("node_network_receive_drop", "Network device statistic receive_drop.", "receive_drops"),
    ("node_network_transmit_drop", "Network device statistic transmit_drop.", "transmit_drops"),
)

# (metric without _total, help, PressureTelemetry field)
_PRESSURE_METRICS = (
    (
        "node_pressure_cpu_waiting_seconds",
        "Total time in seconds that processes have waited for CPU time.",
        "cpu_some_total_seconds",
    ),
    (
        "node_pressure_memory_stalled_seconds",
        "Total time in seconds no process could make progress due to memory congestion.",
        "memory_full_total_seconds",
    ),
    (
        "node_pressure_io_stalled_seconds",
        "Total time in seconds no process could make progress due to IO congestion.",
        "io_full_total_seconds",
    ),
)

_STATE_LABELS = {
    telemetry_pb2.GPU_COLLECTION_STATE_UNSPECIFIED: "unspecified",
    telemetry_pb2.GPU_COLLECTION_STATE_OK: "ok",
    telemetry_pb2.GPU_COLLECTION_STATE_NO_GPU: "no_gpu",
    telemetry_pb2.GPU_COLLECTION_STATE_ERROR: "error",
    telemetry_pb2.GPU_COLLECTION_STATE_TIMEOUT: "timeout",
}


class TelemetryExporter:
    """A prometheus_client collector serving the latest sample given to `update()`.

    `update()` may be called from any thread while the registry is being scraped.
    """

    def __init__(
        self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._sample: telemetry_pb2.TelemetrySample | None = None
        self._clock = clock
        self._started = clock()
        self._updated: float | None = None
        self._cpu_lock = threading.Lock()
        self._cpu_reported: dict[str, dict[str, float]] = {}
        registry.register(self)

    def update(self, sample: telemetry_pb2.TelemetrySample) -> None:
        # A copy, so the caller may go on mutating (or spooling) its own message.
        snapshot = telemetry_pb2.TelemetrySample()
        snapshot.CopyFrom(sample)
        with self._lock:
            self._sample = snapshot
            self._updated = self._clock()

    def seconds_since_update(self) -> tuple[float, bool]:
        """(seconds since the latest sample, True), or (seconds since this exporter was made,
        False) while no sample came yet."""
        with self._lock:
            updated = self._updated
        now = self._clock()
        if updated is None:
            return now - self._started, False
        return now - updated, True

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sample = self._sample
        if sample is None:
            return
        seq = GaugeMetricFamily(
            "sentinel_agent_telemetry_seq", "Sequence number of the latest telemetry sample."
        )
        seq.add_metric([], sample.seq)
        yield seq
        if sample.host.HasField("cpu"):
            yield self._cpu_seconds()
        yield from _host_metrics(sample.host)
        yield _gpu_state(sample.gpu_status)
        yield from _gpu_metrics(sample.node_id, sample.gpus)

    def _cpu_seconds(self) -> Metric:
        """node_cpu_seconds_total{cpu, mode}, read now; a counter that the kernel moved back a
        little keeps its last value, as node_exporter does, so it never decreases."""
        family = CounterMetricFamily(
            "node_cpu_seconds", "Seconds the CPUs spent in each mode.", labels=["cpu", "mode"]
        )
        try:
            cpus = HostCollector.cpu_seconds_per_cpu()
        except OSError:
            return family  # empty: no series rather than wrong ones
        with self._cpu_lock:  # scrapes may run concurrently
            for times in cpus:
                reported = self._cpu_reported.get(times.cpu)
                if reported is None or reported["idle"] - times.idle >= _CPU_RESET_SECONDS:
                    reported = self._cpu_reported[times.cpu] = {}
                for mode in _CPU_MODES:
                    value = max(getattr(times, mode), reported.get(mode, 0.0))
                    reported[mode] = value
                    family.add_metric([times.cpu, mode], value)
        return family


def _host_metrics(host: telemetry_pb2.HostTelemetry) -> Iterator[Metric]:
    # A part the collector could not read is absent from the sample: no series, not zeros
    # (a MemTotal of 0 would read as a broken node).
    if host.HasField("load"):
        for period in ("1", "5", "15"):
            load = GaugeMetricFamily(f"node_load{period}", f"{period}m load average.")
            load.add_metric([], getattr(host.load, f"load{period}"))
            yield load

    if host.HasField("memory"):
        for name, documentation, field in _MEMORY_METRICS:
            yield GaugeMetricFamily(name, documentation, value=getattr(host.memory, field))
        yield GaugeMetricFamily(
            "node_memory_SwapFree_bytes",
            "Memory information field SwapFree_bytes.",
            value=max(0, host.memory.swap_total_bytes - host.memory.swap_used_bytes),
        )

    for name, documentation, field in _DISK_METRICS:
        disk = CounterMetricFamily(name, documentation, labels=["device"])
        for io in host.disks:
            disk.add_metric([io.device], getattr(io, field))
        yield disk

    for name, documentation, field in _FILESYSTEM_METRICS:
        filesystem = GaugeMetricFamily(
            name, documentation, labels=["device", "mountpoint", "fstype"]
        )
        for fs in host.filesystems:
            filesystem.add_metric([fs.device, fs.mountpoint, fs.fstype], getattr(fs, field))
        yield filesystem

    for name, documentation, field in _NETWORK_METRICS:
        network = CounterMetricFamily(name, documentation, labels=["device"])
        for nic in host.networks:
            network.add_metric([nic.interface], getattr(nic, field))
        yield network

    if host.HasField("pressure"):
        for name, documentation, field in _PRESSURE_METRICS:
            yield CounterMetricFamily(name, documentation, value=getattr(host.pressure, field))

    if host.boot_time_unix_seconds:
        yield GaugeMetricFamily(
            "node_boot_time_seconds",
            "Node boot time, in unixtime.",
            value=host.boot_time_unix_seconds,
        )


def _gpu_state(status: telemetry_pb2.GpuCollectionStatus) -> Metric:
    state = GaugeMetricFamily(
        "sentinel_agent_gpu_collection_state",
        "State of the agent's GPU collection (1 for the current state).",
        labels=["state"],
    )
    for value, label in _STATE_LABELS.items():
        state.add_metric([label], 1.0 if status.state == value else 0.0)
    return state


def _gpu_metrics(hostname: str, gpus: Sequence[telemetry_pb2.GpuTelemetry]) -> Iterator[Metric]:
    labels = {gpu.index: [str(gpu.index), gpu.uuid, f"nvidia{gpu.index}", hostname] for gpu in gpus}
    unsupported = {gpu.index: frozenset(gpu.unsupported) for gpu in gpus}
    for metric in _GPU_METRICS:
        family = GaugeMetricFamily(metric.name, metric.documentation, labels=_GPU_LABELS)
        for gpu in gpus:
            if metric.field not in unsupported[gpu.index]:
                family.add_metric(labels[gpu.index], metric.convert(getattr(gpu, metric.field)))
        if family.samples:
            yield family


# -- health endpoints ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HealthVerdict:
    """One answer of a health endpoint: whether it passes, and why, in words."""

    ok: bool
    reason: str


class AgentHealth:
    """Judges the agent's liveness and readiness from what it did, for /healthz and /readyz.

    Live (/healthz): the collect loop produced a telemetry sample within `missed_intervals`
    telemetry intervals (at least `min_stale_s`), counted from the agent's start until the first
    sample. A loop that stopped or hangs (a wedged driver call past its deadline, a dead event
    loop) fails it, and the kubelet restarts the agent; a control plane that is down does not,
    since restarting the agent would not bring it back.

    Ready (/readyz): live, and a session with the control plane is open. A DaemonSet rollout of
    an agent that cannot connect (wrong CA, no token, no route) stops there.
    """

    def __init__(
        self,
        exporter: TelemetryExporter,
        *,
        interval_s: Callable[[], float],
        connected: Callable[[], bool],
        missed_intervals: float = 3.0,
        min_stale_s: float = 30.0,
    ) -> None:
        self._exporter = exporter
        self._interval_s = interval_s
        self._connected = connected
        self._missed_intervals = missed_intervals
        self._min_stale_s = min_stale_s

    def live(self) -> HealthVerdict:
        age, sampled = self._exporter.seconds_since_update()
        limit = max(self._missed_intervals * self._interval_s(), self._min_stale_s)
        if age <= limit:
            what = "last telemetry sample" if sampled else "agent start, no sample yet"
            return HealthVerdict(True, f"collecting: {age:.1f} s since {what}")
        if not sampled:
            return HealthVerdict(False, f"no telemetry sample in {age:.1f} s (limit {limit:g} s)")
        return HealthVerdict(
            False, f"collect loop stalled: last sample {age:.1f} s ago (limit {limit:g} s)"
        )

    def ready(self) -> HealthVerdict:
        live = self.live()
        if not live.ok:
            return live
        if not self._connected():
            return HealthVerdict(False, "no session with the control plane")
        return HealthVerdict(True, "connected to the control plane; " + live.reason)


def _wsgi_app(
    registry: CollectorRegistry, health: AgentHealth | None
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    metrics = make_wsgi_app(registry)
    checks: dict[str, Callable[[], HealthVerdict]] = (
        {"/healthz": health.live, "/readyz": health.ready} if health is not None else {}
    )

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        check = checks.get(path)
        if check is None:
            if path in ("/healthz", "/readyz"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"health checks are not configured\n"]
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        verdict = check()
        status = "200 OK" if verdict.ok else "503 Service Unavailable"
        body = f"{'ok' if verdict.ok else 'failing'}: {verdict.reason}\n".encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """The endpoint's server: sleeps until a connection or `shutdown()` comes, where the base
    class wakes every half second to look for a shutdown request (an idle agent paid for two
    thread wake-ups a second, ten per 5 s telemetry interval)."""

    daemon_threads = True
    timeout = 1.0  # handle_request's own wait, should the connection seen have gone

    def server_activate(self) -> None:
        super().server_activate()
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_read, selectors.EVENT_READ)
                while True:
                    ready = [key.fileobj for key, _events in selector.select()]
                    if self._wake_read in ready:
                        return
                    self.handle_request()  # ready: accepts at once, no waiting
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stops `serve_forever` and waits until it returned (call it from another thread)."""
        self._wake_write.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_read.close()
        self._wake_write.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes and scrapes every few seconds are not news; the agent logs what matters."""


def start_http_endpoint(
    listen: str, registry: CollectorRegistry, health: AgentHealth | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serves /metrics (the registry) and, with `health`, /healthz and /readyz on `listen`
    (host:port, port 0 picks one; `server.server_port` tells which) from a daemon thread.
    Stop it with `server.shutdown()` and `server.server_close()`."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # empty: every interface

    class _Server(_ThreadingServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(
        host, int(port), _wsgi_app(registry, health), _Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="agent-http", daemon=True)
    thread.start()
    return server, thread
