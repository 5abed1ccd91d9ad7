"""Host collection with psutil and /proc, read for real on this machine."""

from __future__ import annotations

import collections
import os
import pathlib
import platform
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from nodeagent.collectors import HostCollector

CPU_MODES = ("user", "system", "idle", "iowait", "irq", "softirq", "steal", "nice")


def _psi_readable() -> bool:
    try:
        pathlib.Path("/proc/pressure/cpu").read_text()
    except OSError:
        return False
    return True


def _burn_cpu(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def test_memory_matches_psutil() -> None:
    host = HostCollector().collect()

    assert host.memory.total_bytes > 0
    assert host.memory.total_bytes == psutil.virtual_memory().total
    assert 0 < host.memory.available_bytes <= host.memory.total_bytes
    assert host.memory.swap_total_bytes == psutil.swap_memory().total


def test_memory_fields_are_proc_meminfos_own(tmp_path: pathlib.Path) -> None:
    """node_memory_Cached_bytes is /proc/meminfo's Cached; psutil's adds SReclaimable."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24683652 kB\n"
        "MemFree:        17123456 kB\n"
        "MemAvailable:   24011000 kB\n"
        "Buffers:          179728 kB\n"
        "Cached:          5896732 kB\n"
        "SwapCached:            0 kB\n"
        "SReclaimable:     605908 kB\n"
        "HugePages_Total:       0\n"
        "Hugepagesize:       2048 kB\n"
    )

    memory = HostCollector(meminfo_path=meminfo).collect().memory

    assert memory.total_bytes == 24683652 * 1024
    assert memory.free_bytes == 17123456 * 1024
    assert memory.available_bytes == 24011000 * 1024
    assert memory.used_bytes == (24683652 - 24011000) * 1024
    assert memory.buffers_bytes == 179728 * 1024
    assert memory.cached_bytes == 5896732 * 1024


def test_cached_memory_on_this_host_is_proc_meminfos_cached() -> None:
    def cached_kib() -> int:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return int(line.split()[1])
        pytest.skip("no Cached in /proc/meminfo")

    if not pathlib.Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo on this platform")
    before = cached_kib() * 1024
    memory = HostCollector().collect().memory
    after = cached_kib() * 1024

    # The page cache moves with everything else on the host; 1 % is far below SReclaimable.
    low, high = sorted((before, after))
    assert low * 0.99 <= memory.cached_bytes <= high * 1.01


def test_per_cpu_seconds_keep_the_kernels_cpu_numbers(tmp_path: pathlib.Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  600 20 300 9000 40 5 6 7 0 0\n"
        "cpu0 300 10 150 4500 20 2 3 4 0 0\n"
        # cpu1 is offline: absent from /proc/stat, and cpu2 must not take its number.
        "cpu2 300 10 150 4500 20 3 3 3 0 0\n"
        "cpu3 100 0 50 900\n"  # an old kernel without iowait and later columns
        "intr 12345 0 0\n"
        "ctxt 987654\n"
        "btime 1700000000\n"
    )
    hz = os.sysconf("SC_CLK_TCK")

    cpus = HostCollector.cpu_seconds_per_cpu(stat)

    assert [times.cpu for times in cpus] == ["0", "2", "3"]
    cpu2 = cpus[1]
    assert (cpu2.user, cpu2.nice, cpu2.system, cpu2.idle) == (
        300 / hz,
        10 / hz,
        150 / hz,
        4500 / hz,
    )
    assert (cpu2.iowait, cpu2.irq, cpu2.softirq, cpu2.steal) == (20 / hz, 3 / hz, 3 / hz, 3 / hz)
    assert (cpus[2].idle, cpus[2].iowait, cpus[2].steal) == (900 / hz, 0.0, 0.0)


def test_per_cpu_seconds_on_this_host_match_psutil() -> None:
    before = psutil.cpu_times(percpu=True)
    cpus = HostCollector.cpu_seconds_per_cpu()
    after = psutil.cpu_times(percpu=True)

    assert len(cpus) == len(before) == len(after)
    for earlier, ours, later in zip(before, cpus, after, strict=True):
        for mode in CPU_MODES:
            value = getattr(ours, mode)
            assert getattr(earlier, mode, 0.0) <= value <= getattr(later, mode, 0.0), mode


def test_cpu_seconds_never_decrease_and_utilization_is_a_share() -> None:
    collector = HostCollector()

    first = collector.collect().cpu
    _burn_cpu(0.3)
    second = collector.collect().cpu

    for mode in CPU_MODES:
        assert getattr(second, f"{mode}_seconds") >= getattr(first, f"{mode}_seconds"), mode
    assert second.user_seconds + second.system_seconds > 0
    assert first.utilization_percent == 0.0
    assert list(first.per_cpu_utilization_percent) == [0.0] * first.logical_cpus
    assert 0.0 < second.utilization_percent <= 100.0
    assert second.logical_cpus == psutil.cpu_count()
    assert len(second.per_cpu_utilization_percent) == second.logical_cpus
    assert all(0.0 <= share <= 100.0 for share in second.per_cpu_utilization_percent)
    # The busy loop kept (at least) one CPU mostly busy.
    assert max(second.per_cpu_utilization_percent) > 20.0


def test_utilization_baseline_is_shared_across_threads() -> None:
    """Unlike psutil.cpu_percent(None), the second call from another thread is not a first."""
    collector = HostCollector()
    with ThreadPoolExecutor(max_workers=1) as first_thread:
        first_thread.submit(collector.collect).result()
    _burn_cpu(0.3)
    with ThreadPoolExecutor(max_workers=1) as second_thread:
        cpu = second_thread.submit(collector.collect).result().cpu

    assert cpu.utilization_percent > 0.0


def test_load_average_and_boot_time() -> None:
    host = HostCollector().collect()

    assert (host.load.load1, host.load.load5, host.load.load15) == pytest.approx(
        os.getloadavg(), abs=1.0
    )
    assert host.boot_time_unix_seconds == int(psutil.boot_time())


def test_networks_include_loopback_with_counters() -> None:
    networks = {nic.interface: nic for nic in HostCollector().collect().networks}

    assert "lo" in networks
    assert set(networks) == set(psutil.net_io_counters(pernic=True))
    assert networks["lo"].receive_bytes >= 0


def test_disks_leave_out_loop_and_ram_devices() -> None:
    disks = HostCollector().collect().disks

    names = [disk.device for disk in disks]
    assert not [name for name in names if name.startswith(("loop", "ram", "zram"))]
    real = psutil.disk_io_counters(perdisk=True) or {}
    for disk in disks:
        assert disk.device in real
        assert disk.read_bytes <= real[disk.device].read_bytes
        assert disk.io_time_seconds >= 0


def test_filesystems_are_real_and_listed_once_per_device() -> None:
    filesystems = HostCollector().collect().filesystems

    devices = [fs.device for fs in filesystems]
    assert len(devices) == len(set(devices))
    for fs in filesystems:
        assert fs.fstype not in {"proc", "sysfs", "tmpfs", "overlay", "squashfs", "devtmpfs"}
        assert fs.size_bytes > 0
        assert fs.avail_bytes <= fs.free_bytes <= fs.size_bytes
    partitions = [p for p in psutil.disk_partitions(all=False) if p.mountpoint == "/"]
    if partitions and partitions[0].fstype not in {"overlay", "tmpfs"}:
        [root] = [fs for fs in filesystems if fs.mountpoint == "/"]
        stat = os.statvfs("/")
        assert root.size_bytes == stat.f_blocks * stat.f_frsize


def test_pressure_is_present_exactly_when_the_kernel_has_psi() -> None:
    host = HostCollector().collect()

    assert (host.pressure is not None) == _psi_readable()
    if host.pressure is not None:
        assert host.pressure.cpu_some_total_seconds >= 0


def test_pressure_files_are_parsed_into_percent_and_seconds(tmp_path: pathlib.Path) -> None:
    (tmp_path / "cpu").write_text(
        "some avg10=1.50 avg60=0.80 avg300=0.20 total=3400563\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    (tmp_path / "memory").write_text(
        "some avg10=2.25 avg60=0.00 avg300=0.00 total=10\n"
        "full avg10=1.25 avg60=0.00 avg300=0.00 total=2000000\n"
    )
    (tmp_path / "io").write_text(
        "some avg10=4.00 avg60=0.02 avg300=0.04 total=1130658\n"
        "full avg10=3.00 avg60=0.02 avg300=0.04 total=1051400\n"
    )

    pressure = HostCollector(pressure_dir=tmp_path).collect().pressure

    assert pressure.cpu_some_avg10 == 1.5
    assert pressure.cpu_some_total_seconds == pytest.approx(3.400563)
    assert (pressure.memory_some_avg10, pressure.memory_full_avg10) == (2.25, 1.25)
    assert pressure.memory_full_total_seconds == pytest.approx(2.0)
    assert (pressure.io_some_avg10, pressure.io_full_avg10) == (4.0, 3.0)
    assert pressure.io_full_total_seconds == pytest.approx(1.0514)


def test_a_kernel_without_psi_leaves_pressure_unset(tmp_path: pathlib.Path) -> None:
    host = HostCollector(pressure_dir=tmp_path / "missing").collect()

    assert host.pressure is None
    assert host.memory.total_bytes > 0


def test_an_unreadable_part_costs_only_that_part(tmp_path: pathlib.Path) -> None:
    # Reading a directory raises IsADirectoryError, a real OSError from the kernel.
    (tmp_path / "cpu").mkdir()
    (tmp_path / "memory").mkdir()
    (tmp_path / "io").write_text("some avg10=4.00 avg60=0.02 avg300=0.04 total=1000000\n")

    host = HostCollector(pressure_dir=tmp_path).collect()

    assert host.pressure is not None
    assert host.pressure.io_some_avg10 == 4.0
    assert host.pressure.cpu_some_total_seconds == 0.0
    assert host.memory.total_bytes > 0
    assert host.networks


def test_inventory_matches_platform_and_psutil() -> None:
    inventory = HostCollector().inventory()

    assert inventory.hostname == socket.gethostname()
    assert inventory.os == platform.system()
    assert inventory.kernel_version == platform.release()
    assert inventory.architecture == platform.machine()
    assert inventory.logical_cpus == psutil.cpu_count(logical=True)
    assert inventory.physical_cpus == (psutil.cpu_count(logical=False) or 0)
    assert inventory.memory_total_bytes == psutil.virtual_memory().total
    assert inventory.boot_time_unix_seconds == int(psutil.boot_time())


def test_counters_read_from_proc_agree_with_psutil() -> None:
    """The collector reads /proc itself (one read per file per snapshot); what it reports is
    what psutil reports, read just before and just after."""
    swap_before = psutil.swap_memory()
    disks_before = psutil.disk_io_counters(perdisk=True) or {}
    nics_before = psutil.net_io_counters(pernic=True)
    host = HostCollector().collect()
    swap_after = psutil.swap_memory()
    disks_after = psutil.disk_io_counters(perdisk=True) or {}
    nics_after = psutil.net_io_counters(pernic=True)

    memory = host.memory
    assert memory.swap_total_bytes == swap_after.total
    assert swap_before.sin <= memory.swap_in_bytes <= swap_after.sin
    assert swap_before.sout <= memory.swap_out_bytes <= swap_after.sout
    for disk in host.disks:
        before, after = disks_before[disk.device], disks_after[disk.device]
        assert before.read_bytes <= disk.read_bytes <= after.read_bytes
        assert before.write_bytes <= disk.written_bytes <= after.write_bytes
        assert before.write_count <= disk.writes_completed <= after.write_count
        assert before.busy_time / 1000 <= disk.io_time_seconds <= after.busy_time / 1000
    for nic in host.networks:
        before_nic, after_nic = nics_before[nic.interface], nics_after[nic.interface]
        assert before_nic.bytes_recv <= nic.receive_bytes <= after_nic.bytes_recv
        assert before_nic.packets_sent <= nic.transmit_packets <= after_nic.packets_sent
        assert before_nic.dropin <= nic.receive_drops <= after_nic.dropin
    assert host.boot_time_unix_seconds == int(psutil.boot_time())
    assert host.cpu is not None and host.cpu.logical_cpus == len(psutil.cpu_times(percpu=True))


def test_the_mount_table_is_parsed_again_exactly_when_it_changed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psutil parses the table (and finds the root device) only when /proc/self/mounts
    changed; a snapshot after a mount sees the new table."""
    partition = collections.namedtuple("partition", "device mountpoint fstype opts")
    table = [partition("/dev/first", "/", "ext4", "rw")]
    calls: list[int] = []

    def partitions(all: bool = False) -> list[Any]:
        calls.append(1)
        return list(table)

    monkeypatch.setattr(psutil, "disk_partitions", partitions)
    collector = HostCollector()
    assert [fs.device for fs in collector.collect().filesystems] == ["/dev/first"]
    table[0] = partition("/dev/second", "/", "ext4", "rw")
    assert [fs.device for fs in collector.collect().filesystems] == ["/dev/first"]
    assert len(calls) == 1

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount here (needs root)")
    try:
        assert [fs.device for fs in collector.collect().filesystems] == ["/dev/second"]
        assert len(calls) == 2
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
