"""Host telemetry from /proc (psutil elsewhere): CPU, load, memory, disks, filesystems, network,
PSI.

The collector blocks (it reads /proc and calls statvfs), so it is meant to run in a worker
thread; one failing part never costs the rest of the snapshot. On Linux it reads each /proc file
once per snapshot and parses it the way psutil does (psutil would read /proc/stat three times
and /proc/meminfo twice, and build a named tuple per line); the mount table is parsed again
only when it changed. Where /proc is missing, psutil answers.
"""

from __future__ import annotations

import logging
import operator
import os
import platform
import re
import select
import socket
import threading
import weakref
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
_PROC_VMSTAT = "/proc/vmstat"
_PROC_DISKSTATS = "/proc/diskstats"
_PROC_NET_DEV = "/proc/net/dev"
_PROC_MOUNTS = "/proc/self/mounts"
_READ_CHUNK = 16 * 1024

# psutil's DISK_SECTOR_SIZE: /proc/diskstats counts 512-byte sectors whatever the device's.
_SECTOR_BYTES = 512
# /proc/vmstat's pswpin/pswpout count pages; psutil converts them with 4 KiB.
_SWAP_PAGE_BYTES = 4 * 1024

# /proc/stat counts CPU time in USER_HZ ticks (100 on every mainstream Linux build).
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_KIB = 1024


class _CpuSplit(NamedTuple):
    busy: float
    total: float


def _read(path: str | Path) -> bytes:
    """A whole (small, /proc) file: one open, reads until EOF, one close, and no file object
    (half the cost of open().read() for these)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _READ_CHUNK)
        if not data:
            return data
        chunks = [data]
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks) if len(chunks) > 1 else data
    finally:
        os.close(fd)


def _split_ticks(fields: Sequence[bytes]) -> _CpuSplit:
    """A /proc/stat CPU line's busy and total time in ticks, counted as `_split` counts
    psutil's seconds (utilization is a ratio of the two, so the unit does not matter)."""
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already
    # inside user and nice.
    values = list(map(int, fields[:8]))
    total = sum(values)
    idle = values[3] + values[4] if len(values) > 4 else values[3]
    return _CpuSplit(total - idle, total)


class _NoWrap:
    """psutil's `nowrap` for counters read straight from /proc: a counter that goes back (a
    32-bit kernel counter that wrapped) keeps counting from where it was, so values never
    decrease; a device that disappears is forgotten."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, ...]] = {}
        self._offsets: dict[str, list[int]] = {}

    def apply(self, counters: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        last, offsets = self._last, self._offsets
        self._last = counters
        if not offsets and all(
            # The common case: nothing went back (one comparison loop in C per device).
            (previous := last.get(name)) is None
            or len(previous) != len(values)
            or all(map(operator.ge, values, previous))
            for name, values in counters.items()
        ):
            return counters
        adjusted: dict[str, tuple[int, ...]] = {}
        for name, values in counters.items():
            previous = last.get(name)
            offset = offsets.get(name)
            if previous is not None and len(previous) == len(values):
                for i, (value, before) in enumerate(zip(values, previous, strict=True)):
                    if value < before:
                        if offset is None:
                            offset = offsets[name] = [0] * len(values)
                        offset[i] += before
            adjusted[name] = values if offset is None else tuple(map(operator.add, values, offset))
        for gone in last.keys() - counters.keys():
            offsets.pop(gone, None)
        return adjusted


def _parse_diskstats(text: bytes) -> dict[str, tuple[int, ...]]:
    """/proc/diskstats as psutil reads it: {name: (reads, writes, read sectors, written sectors,
    busy ms)} for every line it understands (the line layouts of Linux 2.4, 2.6 and later),
    leaving out the devices node_exporter leaves out."""
    disks: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines():
        fields = line.split()
        count = len(fields)
        if count < 7 or _EXCLUDED_DISKS.match(fields[3 if count == 15 else 2].decode()):
            continue  # not reported: neither converted nor tracked
        if count == 15:  # Linux 2.4
            name = fields[3]
            reads, rsectors, writes, wsectors, busy = (
                fields[2],
                fields[5],
                fields[7],
                fields[9],
                fields[12],
            )
        elif count == 14 or count >= 18:  # Linux 2.6+: a disk (4.18+ and 5.5+ add fields)
            name = fields[2]
            reads, rsectors, writes, wsectors, busy = (
                fields[3],
                fields[5],
                fields[7],
                fields[9],
                fields[12],
            )
        elif count == 7:  # Linux 2.6+: a partition
            name = fields[2]
            reads, rsectors, writes, wsectors, busy = (
                fields[3],
                fields[4],
                fields[5],
                fields[6],
                b"0",
            )
        else:
            continue
        disks[name.decode()] = (int(reads), int(writes), int(rsectors), int(wsectors), int(busy))
    return disks


def _parse_net_dev(text: bytes) -> dict[str, tuple[int, ...]]:
    """/proc/net/dev: {interface: (receive bytes, packets, errors, drops, then the same four
    for transmit)}; of its 16 counters, the 8 the telemetry carries."""
    nics: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines()[2:]:
        name, colon, rest = line.rpartition(b":")
        if colon:
            f = rest.split()
            nics[name.strip().decode()] = (
                int(f[0]),
                int(f[1]),
                int(f[2]),
                int(f[3]),
                int(f[8]),
                int(f[9]),
                int(f[10]),
                int(f[11]),
            )
    return nics


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


# The /proc/meminfo fields the collector uses, with their colon as the kernel writes them.
_MEMINFO_FIELDS = (
    b"MemTotal:",
    b"MemFree:",
    b"MemAvailable:",
    b"Buffers:",
    b"Cached:",
    b"SwapTotal:",
    b"SwapFree:",
)

# A /proc/pressure line: "some avg10=1.50 avg60=0.80 avg300=0.20 total=3400563".
_PSI_LINE = re.compile(rb"^(some|full) avg10=([0-9.]+) .*?total=([0-9]+)", re.MULTILINE)


def _line_number(text: bytes, name: bytes) -> int | None:
    """The number after `name` at the start of a line ("MemTotal:  24683652 kB", "btime 17")
    of a /proc file, found without splitting the file into lines; None when absent."""
    if text.startswith(name):
        start = len(name)
    else:
        start = text.find(b"\n" + name)
        if start < 0:
            return None
        start += 1 + len(name)
    end = text.find(b"\n", start)
    return int(text[start : end if end >= 0 else None].split()[0])


def _parse_meminfo(text: bytes) -> dict[bytes, int]:
    """The /proc/meminfo fields the collector uses, keyed by name with its colon (b"Cached:"),
    as the kernel writes them (in kB, i.e. KiB); a field the kernel does not have is absent."""
    fields: dict[bytes, int] = {}
    for name in _MEMINFO_FIELDS:
        value = _line_number(text, name)
        if value is not None:
            fields[name] = value
    return fields


class _MountWatch:
    """Tells whether the mount table changed since the last call, without reading it: the
    kernel marks an open /proc/self/mounts with POLLPRI after every mount or unmount (proc(5)),
    so a snapshot costs one poll instead of reading and comparing the whole table."""

    def __init__(self, fd: int) -> None:
        self._poll = select.poll()
        self._poll.register(fd, select.POLLPRI | select.POLLERR)
        self.filesystems: list[tuple[str, str, str]] = []
        weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls) -> _MountWatch | None:
        """A watch from now on; None where there is no /proc/self/mounts (not Linux)."""
        try:
            fd = os.open(_PROC_MOUNTS, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return cls(fd)

    def changed(self) -> bool:
        return bool(self._poll.poll(0))


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
        self._pressure_paths = tuple(
            (resource, os.path.join(pressure_dir, resource)) for resource in ("cpu", "memory", "io")
        )
        self._meminfo_path = meminfo_path
        self._lock = threading.Lock()
        self._previous_total: _CpuSplit | None = None
        self._previous_per_cpu: list[_CpuSplit] = []
        self._boot_time = 0
        self._disk_counters = _NoWrap()
        self._network_counters = _NoWrap()
        # The filesystems of the mount table as last parsed: parsed again only when the
        # kernel says the table changed (None: not parsed yet, or no /proc to watch).
        self._mounts: _MountWatch | None = None
        self._mounts_lock = threading.Lock()

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
        # /proc/stat's btime, read with the CPU times; psutil where there is none.
        boot_time = (
            float(self._boot_time)
            if self._boot_time
            else self._safely("boot time", psutil.boot_time)
        )
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
        try:
            text = _read(_PROC_STAT)
        except FileNotFoundError:
            return self._cpu_from_psutil()
        # One read for the sum, every CPU and the boot time (psutil reads the file per call).
        # The CPU lines come first; what follows them (the long "intr" line above all) is not
        # split, only searched for btime.
        total_fields: list[bytes] = []
        per_cpu_fields: list[list[bytes]] = []
        cpu_lines_end = text.find(b"\nintr ")
        for line in (text if cpu_lines_end < 0 else text[:cpu_lines_end]).splitlines():
            if line.startswith(b"cpu"):
                fields = line.split()
                if fields[0] == b"cpu":
                    total_fields = fields[1:]
                else:
                    per_cpu_fields.append(fields[1:])
        self._boot_time = _line_number(text, b"btime ") or self._boot_time
        ticks = _CLOCK_TICKS
        seconds = [int(value) / ticks for value in total_fields[:8]]
        seconds += [0.0] * (8 - len(seconds))
        user, nice, system, idle, iowait, irq, softirq, steal = seconds
        return self._cpu_times(
            user=user,
            nice=nice,
            system=system,
            idle=idle,
            iowait=iowait,
            irq=irq,
            softirq=softirq,
            steal=steal,
            total_split=_split_ticks(total_fields),
            per_cpu_split=list(map(_split_ticks, per_cpu_fields)),
        )

    def _cpu_from_psutil(self) -> CpuTimes:
        total = psutil.cpu_times()
        # psutil names the modes the way /proc/stat does; a platform without one leaves it at 0.
        return self._cpu_times(
            user=float(total.user),
            nice=float(getattr(total, "nice", 0.0)),
            system=float(total.system),
            idle=float(total.idle),
            iowait=float(getattr(total, "iowait", 0.0)),
            irq=float(getattr(total, "irq", 0.0)),
            softirq=float(getattr(total, "softirq", 0.0)),
            steal=float(getattr(total, "steal", 0.0)),
            total_split=_split(total),
            per_cpu_split=[_split(times) for times in psutil.cpu_times(percpu=True)],
        )

    def _cpu_times(
        self,
        *,
        user: float,
        nice: float,
        system: float,
        idle: float,
        iowait: float,
        irq: float,
        softirq: float,
        steal: float,
        total_split: _CpuSplit,
        per_cpu_split: list[_CpuSplit],
    ) -> CpuTimes:
        with self._lock:
            utilization = (
                _busy_percent(self._previous_total, total_split)
                if self._previous_total is not None
                else 0.0
            )
            per_cpu_utilization = self._per_cpu_percent(self._previous_per_cpu, per_cpu_split)
            self._previous_total = total_split
            self._previous_per_cpu = per_cpu_split
        return CpuTimes(
            user_seconds=user,
            system_seconds=system,
            idle_seconds=idle,
            iowait_seconds=iowait,
            irq_seconds=irq,
            softirq_seconds=softirq,
            steal_seconds=steal,
            nice_seconds=nice,
            utilization_percent=utilization,
            per_cpu_utilization_percent=tuple(per_cpu_utilization),
            logical_cpus=len(per_cpu_split),
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
            meminfo = _parse_meminfo(_read(self._meminfo_path))
        except FileNotFoundError:
            meminfo = {}  # not Linux
        # Swap is read separately so a failure there (no /proc/vmstat in some sandboxes) keeps
        # the RAM numbers.
        swap = HostCollector._safely("swap", lambda: _swap(meminfo))
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

    def _disks(self) -> tuple[DiskIo, ...]:
        try:
            counters = self._disk_counters.apply(_parse_diskstats(_read(_PROC_DISKSTATS)))
        except FileNotFoundError:
            return self._disks_from_psutil()
        return tuple(
            DiskIo(
                device=device,
                read_bytes=rsectors * _SECTOR_BYTES,
                written_bytes=wsectors * _SECTOR_BYTES,
                reads_completed=reads,
                writes_completed=writes,
                io_time_seconds=busy_ms / 1000.0,
            )
            for device, (reads, writes, rsectors, wsectors, busy_ms) in sorted(counters.items())
        )

    @staticmethod
    def _disks_from_psutil() -> tuple[DiskIo, ...]:
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

    def _filesystems(self) -> tuple[FilesystemUsage, ...]:
        filesystems: list[FilesystemUsage] = []
        for mountpoint, device, fstype in self._real_filesystems():
            try:
                size, free, avail = _filesystem_usage(mountpoint)
            except OSError:
                # A stale NFS mount or a mountpoint this user may not stat: skip just that one.
                _log.debug("could not stat %s", mountpoint, exc_info=True)
                continue
            filesystems.append(
                FilesystemUsage(
                    mountpoint=mountpoint,
                    device=device,
                    fstype=fstype,
                    size_bytes=size,
                    free_bytes=free,
                    avail_bytes=avail,
                )
            )
        return tuple(filesystems)

    def _real_filesystems(self) -> list[tuple[str, str, str]]:
        """(mountpoint, device, fstype) of the filesystems worth reporting, one per device."""
        with self._mounts_lock:
            if self._mounts is not None and not self._mounts.changed():
                return self._mounts.filesystems
            watch = self._mounts or _MountWatch.open()
            selected: list[tuple[str, str, str]] = []
            seen_devices: set[str] = set()
            for partition in psutil.disk_partitions(all=False):
                if (
                    partition.fstype in _PSEUDO_FSTYPES
                    or _EXCLUDED_MOUNTPOINTS.match(partition.mountpoint)
                    # Bind mounts (common in containers) show one filesystem several times.
                    or partition.device in seen_devices
                ):
                    continue
                selected.append((partition.mountpoint, partition.device, partition.fstype))
                seen_devices.add(partition.device)
            if watch is not None:
                watch.filesystems = selected
                self._mounts = watch
            return selected

    def _networks(self) -> tuple[NetworkIo, ...]:
        try:
            counters = self._network_counters.apply(_parse_net_dev(_read(_PROC_NET_DEV)))
        except FileNotFoundError:
            return self._networks_from_psutil()
        return tuple(
            NetworkIo(
                interface=interface,
                receive_bytes=rx_bytes,
                transmit_bytes=tx_bytes,
                receive_packets=rx_packets,
                transmit_packets=tx_packets,
                receive_errors=rx_errors,
                transmit_errors=tx_errors,
                receive_drops=rx_drops,
                transmit_drops=tx_drops,
            )
            for interface, (
                rx_bytes,
                rx_packets,
                rx_errors,
                rx_drops,
                tx_bytes,
                tx_packets,
                tx_errors,
                tx_drops,
            ) in sorted(counters.items())
        )

    @staticmethod
    def _networks_from_psutil() -> tuple[NetworkIo, ...]:
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
        # (resource, kind) -> (avg10 in %, total in seconds)
        lines: dict[tuple[str, bytes], tuple[float, float]] = {}
        read_any = False
        for resource, path in self._pressure_paths:
            try:
                text = _read(path)
            except OSError:
                _log.debug("could not read %s", path, exc_info=True)
                continue
            read_any = True
            for kind, avg10, total in _PSI_LINE.findall(text):
                lines[resource, kind] = (float(avg10), int(total) * _MICROSECONDS)
        if not read_any:
            return None
        none = (0.0, 0.0)
        cpu_some = lines.get(("cpu", b"some"), none)
        memory_some = lines.get(("memory", b"some"), none)
        memory_full = lines.get(("memory", b"full"), none)
        io_some = lines.get(("io", b"some"), none)
        io_full = lines.get(("io", b"full"), none)
        return Pressure(
            cpu_some_avg10=cpu_some[0],
            memory_some_avg10=memory_some[0],
            memory_full_avg10=memory_full[0],
            io_some_avg10=io_some[0],
            io_full_avg10=io_full[0],
            cpu_some_total_seconds=cpu_some[1],
            memory_full_total_seconds=memory_full[1],
            io_full_total_seconds=io_full[1],
        )


def _swap(meminfo: dict[bytes, int]) -> Any:
    """psutil's swap_memory, from a /proc/meminfo already read (psutil would read it again)."""
    if b"SwapTotal:" not in meminfo or b"SwapFree:" not in meminfo:
        return psutil.swap_memory()
    total = meminfo[b"SwapTotal:"] * _KIB
    free = meminfo[b"SwapFree:"] * _KIB
    swapped_in = swapped_out = 0
    try:
        vmstat = _read(_PROC_VMSTAT)
    except OSError:
        pass  # psutil reports 0 too (with a warning)
    else:
        swapped_in = (_line_number(vmstat, b"pswpin ") or 0) * _SWAP_PAGE_BYTES
        swapped_out = (_line_number(vmstat, b"pswpout ") or 0) * _SWAP_PAGE_BYTES
    return _Swap(total=total, used=total - free, sin=swapped_in, sout=swapped_out)


class _Swap(NamedTuple):
    total: int
    used: int
    sin: int
    sout: int


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
