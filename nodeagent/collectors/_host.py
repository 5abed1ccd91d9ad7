"""Host telemetry from psutil and /proc: CPU, load, memory, disks, filesystems, network, PSI.

The collector blocks (it reads /proc and calls statvfs), so it is meant to run in a worker
thread; one failing part never costs the rest of the snapshot.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psutil

from nodeagent.collectors._values import (
    CpuModeSeconds,
    CpuTimes,
    DiskIo,
    FilesystemUsage,
    HostInventory,
    HostSnapshot,
    LoadAverage,
    MemoryUsage,
    NetworkIo,
    Pressure,
)

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

# node_exporter's default `--collector.diskstats.device-exclude`: RAM and loop devices carry no
# disk I/O worth watching, and partitions would count their parent device's I/O twice.
_EXCLUDED_DISKS = re.compile(r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$")

# node_exporter's default `--collector.filesystem.fs-types-exclude`, plus ramfs, which reports no
# size at all.
_PSEUDO_FSTYPES = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "erofs",
        "fusectl",
        "hugetlbfs",
        "iso9660",
        "mqueue",
        "nsfs",
        "overlay",
        "proc",
        "procfs",
        "pstore",
        "ramfs",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "squashfs",
        "sysfs",
        "tracefs",
    }
)

# node_exporter's default `--collector.filesystem.mount-points-exclude`.
_EXCLUDED_MOUNTPOINTS = re.compile(
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)

_MICROSECONDS = 1e-6

_PROC_STAT = Path("/proc/stat")
_PROC_MEMINFO = Path("/proc/meminfo")

# /proc/stat counts CPU time in USER_HZ ticks (100 on every mainstream Linux build).
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_KIB = 1024


class _CpuSplit(NamedTuple):
    busy: float
    total: float


def _split(times: Any) -> _CpuSplit:
    total = float(sum(times))
    # Linux already counts guest time inside user and nice; psutil's cpu_percent subtracts it
    # the same way, so our numbers agree with top and psutil.
    total -= float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    idle = float(times.idle) + float(getattr(times, "iowait", 0.0))
    return _CpuSplit(busy=total - idle, total=total)


def _busy_percent(before: _CpuSplit, after: _CpuSplit) -> float:
    elapsed = after.total - before.total
    if elapsed <= 0:
        return 0.0
    return min(100.0, max(0.0, (after.busy - before.busy) / elapsed * 100.0))


def _parse_cpu_lines(text: bytes, ticks: float) -> tuple[CpuModeSeconds, ...]:
    """The per-CPU lines of /proc/stat ("cpu3 user nice system idle iowait irq softirq steal
    ..."), in seconds; modes an old kernel does not report are 0."""
    cpus: list[CpuModeSeconds] = []
    for line in text.splitlines():
        # The first line ("cpu  ...") is the sum over all CPUs; node_exporter has no such series.
        if not line.startswith(b"cpu") or not line[3:4].isdigit():
            continue
        fields = line.split()
        seconds = [int(value) / ticks for value in fields[1:9]]
        seconds += [0.0] * (8 - len(seconds))
        cpus.append(CpuModeSeconds(fields[0][3:].decode(), *seconds))
    return tuple(cpus)


def _parse_meminfo(text: bytes) -> dict[bytes, int]:
    """/proc/meminfo's fields as the kernel writes them, keyed by name with its colon
    (b"Cached:"); the sizes used here are in kB (KiB)."""
    fields: dict[bytes, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 1:
            fields[parts[0]] = int(parts[1])
    return fields


def _parse_pressure(text: str) -> dict[str, dict[str, float]]:
    """Parses a /proc/pressure file into {"some": {"avg10": …, "total": …}, "full": {…}}."""
    lines: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        values: dict[str, float] = {}
        for item in rest.split():
            key, sep, value = item.partition("=")
            if sep:
                values[key] = float(value)
        lines[kind] = values
    return lines


class HostCollector:
    """Reads host inventory and telemetry. Blocking: call from a worker thread.

    Safe to call from any thread; the CPU-utilization baseline is shared by all callers (unlike
    `psutil.cpu_percent(None)`, whose baseline is per thread).
    """

    def __init__(
        self,
        *,
        pressure_dir: Path = Path("/proc/pressure"),
        meminfo_path: Path = _PROC_MEMINFO,
    ) -> None:
        self._pressure_dir = pressure_dir
        self._meminfo_path = meminfo_path
        self._lock = threading.Lock()
        self._previous_total: _CpuSplit | None = None
        self._previous_per_cpu: list[_CpuSplit] = []

    def inventory(self) -> HostInventory:
        """What this host is; a part that cannot be read is left at zero."""
        memory = self._safely("memory", psutil.virtual_memory)
        boot_time = self._safely("boot time", psutil.boot_time)
        return HostInventory(
            hostname=socket.gethostname(),
            os=platform.system(),
            kernel_version=platform.release(),
            architecture=platform.machine(),
            logical_cpus=psutil.cpu_count(logical=True) or 0,
            physical_cpus=psutil.cpu_count(logical=False) or 0,
            memory_total_bytes=memory.total if memory is not None else 0,
            boot_time_unix_seconds=int(boot_time) if boot_time is not None else 0,
        )

    def collect(self) -> HostSnapshot:
        """One snapshot of the host; a part that cannot be read is None or empty."""
        cpu = self._safely("cpu", self._cpu)
        load = self._safely("load average", psutil.getloadavg)
        memory = self._safely("memory", self._memory)
        disks = self._safely("disks", self._disks)
        filesystems = self._safely("filesystems", self._filesystems)
        networks = self._safely("networks", self._networks)
        pressure = self._pressure()
        boot_time = self._safely("boot time", psutil.boot_time)
        return HostSnapshot(
            cpu=cpu,
            load=LoadAverage(*load) if load is not None else None,
            memory=memory,
            disks=disks or (),
            filesystems=filesystems or (),
            networks=networks or (),
            pressure=pressure,
            boot_time_unix_seconds=int(boot_time) if boot_time is not None else 0,
        )

    @staticmethod
    def _safely(part: str, read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except (OSError, psutil.Error):
            _log.debug("could not read host %s", part, exc_info=True)
            return None

    def _cpu(self) -> CpuTimes:
        total = psutil.cpu_times()
        per_cpu = psutil.cpu_times(percpu=True)
        total_split = _split(total)
        per_cpu_split = [_split(times) for times in per_cpu]
        with self._lock:
            utilization = (
                _busy_percent(self._previous_total, total_split)
                if self._previous_total is not None
                else 0.0
            )
            per_cpu_utilization = self._per_cpu_percent(self._previous_per_cpu, per_cpu_split)
            self._previous_total = total_split
            self._previous_per_cpu = per_cpu_split
        # psutil names the modes the way /proc/stat does; a platform without one leaves it at 0.
        return CpuTimes(
            user_seconds=float(total.user),
            system_seconds=float(total.system),
            idle_seconds=float(total.idle),
            iowait_seconds=float(getattr(total, "iowait", 0.0)),
            irq_seconds=float(getattr(total, "irq", 0.0)),
            softirq_seconds=float(getattr(total, "softirq", 0.0)),
            steal_seconds=float(getattr(total, "steal", 0.0)),
            nice_seconds=float(getattr(total, "nice", 0.0)),
            utilization_percent=utilization,
            per_cpu_utilization_percent=tuple(per_cpu_utilization),
            logical_cpus=len(per_cpu),
        )

    @staticmethod
    def cpu_seconds_per_cpu(stat_path: Path = _PROC_STAT) -> tuple[CpuModeSeconds, ...]:
        """Seconds each logical CPU spent in each mode since boot, read now (one read of
        /proc/stat), numbered as the kernel numbers CPUs. Blocking, but cheap and driver-free."""
        try:
            text = stat_path.read_bytes()
        except FileNotFoundError:
            # Not Linux: psutil's per-CPU list, numbered in its order.
            return tuple(
                CpuModeSeconds(
                    str(number),
                    user=float(times.user),
                    nice=float(getattr(times, "nice", 0.0)),
                    system=float(times.system),
                    idle=float(times.idle),
                    iowait=float(getattr(times, "iowait", 0.0)),
                    irq=float(getattr(times, "irq", 0.0)),
                    softirq=float(getattr(times, "softirq", 0.0)),
                    steal=float(getattr(times, "steal", 0.0)),
                )
                for number, times in enumerate(psutil.cpu_times(percpu=True))
            )
        # Parsed here rather than taken from psutil.cpu_times(percpu=True), which drops the
        # CPU numbers: with a CPU offline, its list index would name the wrong CPU.
        return _parse_cpu_lines(text, _CLOCK_TICKS)

    @staticmethod
    def _per_cpu_percent(before: Sequence[_CpuSplit], after: Sequence[_CpuSplit]) -> list[float]:
        # A CPU brought on- or offline since the last call shifts the indices; report zeros for
        # one interval rather than comparing different CPUs.
        if len(before) != len(after):
            return [0.0] * len(after)
        return [_busy_percent(b, a) for b, a in zip(before, after, strict=True)]

    def _memory(self) -> MemoryUsage:
        try:
            meminfo = _parse_meminfo(self._meminfo_path.read_bytes())
        except FileNotFoundError:
            meminfo = {}  # not Linux
        # Swap is read separately so a failure there (no /proc/vmstat in some sandboxes) keeps
        # the RAM numbers.
        swap = HostCollector._safely("swap", psutil.swap_memory)
        if b"MemAvailable:" in meminfo:
            # /proc/meminfo's own fields, as node_exporter reports them. psutil's "cached" adds
            # SReclaimable (slab), which made node_memory_Cached_bytes some 10-15 % too high.
            total = meminfo[b"MemTotal:"] * _KIB
            available = meminfo[b"MemAvailable:"] * _KIB
            free = meminfo[b"MemFree:"] * _KIB
            used = total - available  # as psutil and free(1) count it
            cached = meminfo.get(b"Cached:", 0) * _KIB
            buffers = meminfo.get(b"Buffers:", 0) * _KIB
        else:
            # Other platforms, and kernels before 3.14 (no MemAvailable, which psutil
            # estimates); Cached and Buffers stay /proc/meminfo's where there is one.
            virtual = psutil.virtual_memory()
            total, available, used, free = (
                virtual.total,
                virtual.available,
                virtual.used,
                virtual.free,
            )
            cached = meminfo.get(b"Cached:", int(getattr(virtual, "cached", 0)) // _KIB) * _KIB
            buffers = meminfo.get(b"Buffers:", int(getattr(virtual, "buffers", 0)) // _KIB) * _KIB
        return MemoryUsage(
            total_bytes=total,
            available_bytes=available,
            used_bytes=used,
            free_bytes=free,
            cached_bytes=cached,
            buffers_bytes=buffers,
            swap_total_bytes=swap.total if swap is not None else 0,
            swap_used_bytes=swap.used if swap is not None else 0,
            swap_in_bytes=swap.sin if swap is not None else 0,
            swap_out_bytes=swap.sout if swap is not None else 0,
        )

    @staticmethod
    def _disks() -> tuple[DiskIo, ...]:
        counters = psutil.disk_io_counters(perdisk=True) or {}
        return tuple(
            DiskIo(
                device=device,
                read_bytes=io.read_bytes,
                written_bytes=io.write_bytes,
                reads_completed=io.read_count,
                writes_completed=io.write_count,
                # busy_time (ms) exists on Linux and FreeBSD only.
                io_time_seconds=float(getattr(io, "busy_time", 0)) / 1000.0,
            )
            for device, io in sorted(counters.items())
            if not _EXCLUDED_DISKS.match(device)
        )

    @staticmethod
    def _filesystems() -> tuple[FilesystemUsage, ...]:
        filesystems: list[FilesystemUsage] = []
        seen_devices: set[str] = set()
        for partition in psutil.disk_partitions(all=False):
            if (
                partition.fstype in _PSEUDO_FSTYPES
                or _EXCLUDED_MOUNTPOINTS.match(partition.mountpoint)
                # Bind mounts (common in containers) show one filesystem several times.
                or partition.device in seen_devices
            ):
                continue
            try:
                size, free, avail = _filesystem_usage(partition.mountpoint)
            except OSError:
                # A stale NFS mount or a mountpoint this user may not stat: skip just that one.
                _log.debug("could not stat %s", partition.mountpoint, exc_info=True)
                continue
            filesystems.append(
                FilesystemUsage(
                    mountpoint=partition.mountpoint,
                    device=partition.device,
                    fstype=partition.fstype,
                    size_bytes=size,
                    free_bytes=free,
                    avail_bytes=avail,
                )
            )
            seen_devices.add(partition.device)
        return tuple(filesystems)

    @staticmethod
    def _networks() -> tuple[NetworkIo, ...]:
        counters = psutil.net_io_counters(pernic=True)
        return tuple(
            NetworkIo(
                interface=interface,
                receive_bytes=io.bytes_recv,
                transmit_bytes=io.bytes_sent,
                receive_packets=io.packets_recv,
                transmit_packets=io.packets_sent,
                receive_errors=io.errin,
                transmit_errors=io.errout,
                receive_drops=io.dropin,
                transmit_drops=io.dropout,
            )
            for interface, io in sorted(counters.items())
        )

    def _pressure(self) -> Pressure | None:
        """Reads PSI; None when the kernel has none (no files, or psi=0 makes reads fail)."""
        resources: dict[str, dict[str, dict[str, float]]] = {}
        for resource in ("cpu", "memory", "io"):
            path = self._pressure_dir / resource
            try:
                resources[resource] = _parse_pressure(path.read_text())
            except (OSError, ValueError):
                _log.debug("could not read %s", path, exc_info=True)
        if not resources:
            return None

        def value(resource: str, kind: str, key: str) -> float:
            return resources.get(resource, {}).get(kind, {}).get(key, 0.0)

        return Pressure(
            cpu_some_avg10=value("cpu", "some", "avg10"),
            memory_some_avg10=value("memory", "some", "avg10"),
            memory_full_avg10=value("memory", "full", "avg10"),
            io_some_avg10=value("io", "some", "avg10"),
            io_full_avg10=value("io", "full", "avg10"),
            cpu_some_total_seconds=value("cpu", "some", "total") * _MICROSECONDS,
            memory_full_total_seconds=value("memory", "full", "total") * _MICROSECONDS,
            io_full_total_seconds=value("io", "full", "total") * _MICROSECONDS,
        )


def _filesystem_usage(mountpoint: str) -> tuple[int, int, int]:
    """(size, free, available to unprivileged users) of the filesystem at `mountpoint`, in bytes."""
    if not hasattr(os, "statvfs"):
        usage = psutil.disk_usage(mountpoint)
        return usage.total, usage.free, usage.free
    # statvfs rather than psutil.disk_usage: psutil's "free" is what unprivileged users may use
    # (f_bavail), while node_filesystem_free_bytes needs the blocks free to root (f_bfree) too.
    stat = os.statvfs(mountpoint)
    return (
        stat.f_blocks * stat.f_frsize,
        stat.f_bfree * stat.f_frsize,
        stat.f_bavail * stat.f_frsize,
    )
