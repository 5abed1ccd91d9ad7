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

    def __init__(self, *, pressure_dir: Path = Path("/proc/pressure")) -> None:
        self._pressure_dir = pressure_dir
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
    def _per_cpu_percent(before: Sequence[_CpuSplit], after: Sequence[_CpuSplit]) -> list[float]:
        # A CPU brought on- or offline since the last call shifts the indices; report zeros for
        # one interval rather than comparing different CPUs.
        if len(before) != len(after):
            return [0.0] * len(after)
        return [_busy_percent(b, a) for b, a in zip(before, after, strict=True)]

    @staticmethod
    def _memory() -> MemoryUsage:
        virtual = psutil.virtual_memory()
        # Swap is read separately so a failure there (no /proc/vmstat in some sandboxes) keeps
        # the RAM numbers.
        swap = HostCollector._safely("swap", psutil.swap_memory)
        return MemoryUsage(
            total_bytes=virtual.total,
            available_bytes=virtual.available,
            used_bytes=virtual.used,
            free_bytes=virtual.free,
            # Linux-only fields; other platforms leave them at zero.
            cached_bytes=int(getattr(virtual, "cached", 0)),
            buffers_bytes=int(getattr(virtual, "buffers", 0)),
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
