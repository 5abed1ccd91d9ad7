"""The agent's /metrics: the latest sample in node_exporter and dcgm-exporter names."""

from __future__ import annotations

import dataclasses
import threading

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sentinel.v1 import telemetry_pb2

from nodeagent import encode
from nodeagent.collectors import GpuCollectionState, GpuReading, GpuStatus, HostCollector
from nodeagent.exporter import TelemetryExporter

MIB = 1024 * 1024
UUID_0 = "GPU-3b2f7a10-5c1e-4d8a-9f00-000000000000"
UUID_1 = "GPU-3b2f7a10-5c1e-4d8a-9f00-000000000001"

CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(registry: CollectorRegistry) -> tuple[Samples, dict[str, str]]:
    """Renders the registry as Prometheus would receive it; returns samples and family types."""
    text = generate_latest(registry).decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def _gpu(index: int, uuid: str, **fields: object) -> telemetry_pb2.GpuTelemetry:
    gpu = telemetry_pb2.GpuTelemetry(
        index=index,
        uuid=uuid,
        utilization_gpu_percent=87,
        utilization_memory_percent=42,
        memory_total_bytes=81_559 * MIB,
        memory_used_bytes=38_147 * MIB + 12_345,
        memory_free_bytes=42_890 * MIB,
        memory_reserved_bytes=522 * MIB,
        sm_clock_mhz=1980,
        memory_clock_mhz=2619,
        temperature_celsius=41,
        power_usage_milliwatts=312_456,
        power_limit_milliwatts=700_000,
        total_energy_millijoules=123_456_789_012,
        throttle_reasons=0x4,
        ecc_corrected_volatile=3,
        ecc_uncorrected_volatile=1,
        fan_speed_percent=30,
        pcie_tx_kbps=1200,
        pcie_rx_kbps=3400,
        last_xid=48,
    )
    for field, value in fields.items():
        setattr(gpu, field, value)
    return gpu


@pytest.fixture(scope="module")
def host() -> telemetry_pb2.HostTelemetry:
    collector = HostCollector()
    collector.collect()
    # The host part of a sample, encoded as the agent encodes it.
    no_gpu = GpuReading(GpuStatus(GpuCollectionState.NO_GPU))
    return encode.telemetry_sample(1, "gpu-node-7", 0, collector.collect(), no_gpu).host


def _sample(host: telemetry_pb2.HostTelemetry, seq: int = 42) -> telemetry_pb2.TelemetrySample:
    sample = telemetry_pb2.TelemetrySample(
        seq=seq,
        node_id="gpu-node-7",
        host=host,
        gpu_status=telemetry_pb2.GpuCollectionStatus(state=telemetry_pb2.GPU_COLLECTION_STATE_OK),
    )
    sample.gpus.append(_gpu(0, UUID_0))
    no_fan = _gpu(1, UUID_1, temperature_celsius=44, fan_speed_percent=0)
    no_fan.unsupported.append("fan_speed_percent")
    sample.gpus.append(no_fan)
    return sample


def test_nothing_is_rendered_before_the_first_sample() -> None:
    registry = CollectorRegistry()
    TelemetryExporter(registry)

    samples, _ = _scrape(registry)

    assert samples == {}


def test_host_metrics_use_node_exporter_names(host: telemetry_pb2.HostTelemetry) -> None:
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(_sample(host))

    samples, types = _scrape(registry)

    assert types["node_cpu_seconds"] == "counter"
    assert _value(samples, "node_load1") == host.load.load1
    assert _value(samples, "node_load15") == host.load.load15
    assert _value(samples, "node_memory_MemTotal_bytes") == host.memory.total_bytes
    assert _value(samples, "node_memory_MemAvailable_bytes") == host.memory.available_bytes
    assert _value(samples, "node_memory_Cached_bytes") == host.memory.cached_bytes
    assert _value(samples, "node_memory_SwapTotal_bytes") == host.memory.swap_total_bytes
    assert _value(samples, "node_memory_SwapFree_bytes") == (
        host.memory.swap_total_bytes - host.memory.swap_used_bytes
    )
    for disk in host.disks:
        assert _value(samples, "node_disk_read_bytes_total", device=disk.device) == disk.read_bytes
        assert (
            _value(samples, "node_disk_written_bytes_total", device=disk.device)
            == disk.written_bytes
        )
        assert (
            _value(samples, "node_disk_io_time_seconds_total", device=disk.device)
            == disk.io_time_seconds
        )
    for fs in host.filesystems:
        labels = {"device": fs.device, "mountpoint": fs.mountpoint, "fstype": fs.fstype}
        assert _value(samples, "node_filesystem_size_bytes", **labels) == fs.size_bytes
        assert _value(samples, "node_filesystem_avail_bytes", **labels) == fs.avail_bytes
        assert _value(samples, "node_filesystem_free_bytes", **labels) == fs.free_bytes
    [lo] = [nic for nic in host.networks if nic.interface == "lo"]
    assert _value(samples, "node_network_receive_bytes_total", device="lo") == lo.receive_bytes
    assert _value(samples, "node_network_transmit_bytes_total", device="lo") == lo.transmit_bytes
    assert _value(samples, "node_network_receive_errs_total", device="lo") == lo.receive_errors
    assert _value(samples, "node_network_transmit_drop_total", device="lo") == lo.transmit_drops
    assert _value(samples, "node_boot_time_seconds") == host.boot_time_unix_seconds
    if host.HasField("pressure"):
        assert (
            _value(samples, "node_pressure_cpu_waiting_seconds_total")
            == host.pressure.cpu_some_total_seconds
        )
        assert (
            _value(samples, "node_pressure_io_stalled_seconds_total")
            == host.pressure.io_full_total_seconds
        )
    else:
        assert "node_pressure_cpu_waiting_seconds_total" not in _names(samples)


def test_cpu_seconds_are_read_per_cpu_at_scrape(host: telemetry_pb2.HostTelemetry) -> None:
    """node_exporter's shape, one series per CPU and mode: the sample carries only the sum."""
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(_sample(host))

    total_before = psutil.cpu_times()
    before = HostCollector.cpu_seconds_per_cpu()
    samples, _ = _scrape(registry)
    after = HostCollector.cpu_seconds_per_cpu()
    total_after = psutil.cpu_times()

    cpu_series = {dict(labels)["cpu"] for name, labels in samples if name.startswith("node_cpu")}
    assert cpu_series == {times.cpu for times in after}
    assert len(cpu_series) == len(psutil.cpu_times(percpu=True))
    for earlier, later in zip(before, after, strict=True):
        for mode in CPU_MODES:
            value = _value(samples, "node_cpu_seconds_total", cpu=later.cpu, mode=mode)
            assert getattr(earlier, mode) <= value <= getattr(later, mode), (later.cpu, mode)
    # Per CPU, they add up to /proc/stat's total line, which rounds once rather than per CPU:
    # up to one tick (0.01 s) per CPU apart.
    for mode in ("user", "system"):
        summed = sum(
            value
            for (name, labels), value in samples.items()
            if name == "node_cpu_seconds_total" and ("mode", mode) in labels
        )
        ticks = 0.01 * len(cpu_series)
        assert getattr(total_before, mode) - ticks <= summed <= getattr(total_after, mode) + ticks


def test_cpu_seconds_never_go_back_unless_the_cpu_was_replugged(
    host: telemetry_pb2.HostTelemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's idle and iowait can step back a little; rate() would read that as a reset."""
    real = HostCollector.cpu_seconds_per_cpu()[0]
    readings = iter(
        [
            (dataclasses.replace(real, cpu="0", user=10.0, idle=100.0, iowait=7.0),),
            # The kernel's jitter: idle and iowait a little below what was reported.
            (dataclasses.replace(real, cpu="0", user=11.0, idle=99.5, iowait=6.9),),
            # Idle 3 s or more back: the CPU was unplugged and came back with new counters.
            (dataclasses.replace(real, cpu="0", user=1.0, idle=2.0, iowait=0.5),),
        ]
    )
    monkeypatch.setattr(HostCollector, "cpu_seconds_per_cpu", staticmethod(lambda: next(readings)))
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(_sample(host))

    seen = []
    for _ in range(3):
        samples, _ = _scrape(registry)
        cpu0 = {
            mode: _value(samples, "node_cpu_seconds_total", cpu="0", mode=mode)
            for mode in CPU_MODES
        }
        seen.append((cpu0["user"], cpu0["idle"], cpu0["iowait"]))

    assert seen == [(10, 100.0, 7.0), (11, 100.0, 7.0), (1, 2.0, 0.5)]


def test_a_part_the_collector_could_not_read_has_no_series(
    host: telemetry_pb2.HostTelemetry,
) -> None:
    sample = _sample(host)
    for part in ("cpu", "memory", "load"):
        sample.host.ClearField(part)
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(sample)

    samples, _ = _scrape(registry)

    names = _names(samples)
    assert not {name for name in names if name.startswith(("node_cpu", "node_memory", "node_load"))}
    assert "node_boot_time_seconds" in names


def test_pressure_is_left_out_when_the_node_has_none(host: telemetry_pb2.HostTelemetry) -> None:
    sample = _sample(host)
    sample.host.ClearField("pressure")
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(sample)

    samples, _ = _scrape(registry)

    assert not {name for name in _names(samples) if name.startswith("node_pressure_")}


def test_gpu_metrics_use_dcgm_exporter_names_and_labels(
    host: telemetry_pb2.HostTelemetry,
) -> None:
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(_sample(host))

    samples, _ = _scrape(registry)

    gpu0 = {"gpu": "0", "UUID": UUID_0, "device": "nvidia0", "Hostname": "gpu-node-7"}
    gpu1 = {"gpu": "1", "UUID": UUID_1, "device": "nvidia1", "Hostname": "gpu-node-7"}
    assert _value(samples, "DCGM_FI_DEV_GPU_TEMP", **gpu0) == 41
    assert _value(samples, "DCGM_FI_DEV_GPU_TEMP", **gpu1) == 44
    assert _value(samples, "DCGM_FI_DEV_GPU_UTIL", **gpu0) == 87
    assert _value(samples, "DCGM_FI_DEV_MEM_COPY_UTIL", **gpu0) == 42
    # Whole MiB, as dcgm-exporter reports framebuffer memory.
    assert _value(samples, "DCGM_FI_DEV_FB_USED", **gpu0) == 38_147
    assert _value(samples, "DCGM_FI_DEV_FB_FREE", **gpu0) == 42_890
    assert _value(samples, "DCGM_FI_DEV_FB_RESERVED", **gpu0) == 522
    assert _value(samples, "DCGM_FI_DEV_SM_CLOCK", **gpu0) == 1980
    assert _value(samples, "DCGM_FI_DEV_MEM_CLOCK", **gpu0) == 2619
    assert _value(samples, "DCGM_FI_DEV_POWER_USAGE", **gpu0) == pytest.approx(312.456)
    assert _value(samples, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", **gpu0) == 123_456_789_012
    assert _value(samples, "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", **gpu0) == 0x4
    assert _value(samples, "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", **gpu0) == 3
    assert _value(samples, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", **gpu0) == 1
    assert _value(samples, "DCGM_FI_DEV_XID_ERRORS", **gpu0) == 48
    assert _value(samples, "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", **gpu0) == 1200
    assert _value(samples, "DCGM_FI_DEV_PCIE_RX_THROUGHPUT", **gpu0) == 3400
    assert _value(samples, "DCGM_FI_DEV_FAN_SPEED", **gpu0) == 30
    # GPU 1 cannot read its fan: the series is absent, not a misleading zero.
    assert ("DCGM_FI_DEV_FAN_SPEED", frozenset(gpu1.items())) not in samples
    assert _value(samples, "DCGM_FI_DEV_SM_CLOCK", **gpu1) == 1980


def test_agent_state_and_sequence_are_exported(host: telemetry_pb2.HostTelemetry) -> None:
    registry = CollectorRegistry()
    TelemetryExporter(registry).update(_sample(host, seq=42))

    samples, _ = _scrape(registry)

    assert _value(samples, "sentinel_agent_telemetry_seq") == 42
    assert _value(samples, "sentinel_agent_gpu_collection_state", state="ok") == 1
    for other in ("no_gpu", "error", "timeout", "unspecified"):
        assert _value(samples, "sentinel_agent_gpu_collection_state", state=other) == 0


def test_the_latest_sample_wins_and_later_mutation_does_not_leak(
    host: telemetry_pb2.HostTelemetry,
) -> None:
    registry = CollectorRegistry()
    exporter = TelemetryExporter(registry)
    exporter.update(_sample(host, seq=1))
    latest = _sample(host, seq=2)
    del latest.gpus[:]
    latest.gpu_status.state = telemetry_pb2.GPU_COLLECTION_STATE_NO_GPU
    exporter.update(latest)
    latest.seq = 99  # the caller keeps using its message

    samples, _ = _scrape(registry)

    assert _value(samples, "sentinel_agent_telemetry_seq") == 2
    assert _value(samples, "sentinel_agent_gpu_collection_state", state="no_gpu") == 1
    assert not {name for name in _names(samples) if name.startswith("DCGM_")}


def test_updates_from_another_thread_while_scraping(host: telemetry_pb2.HostTelemetry) -> None:
    registry = CollectorRegistry()
    exporter = TelemetryExporter(registry)

    def sample(seq: int) -> telemetry_pb2.TelemetrySample:
        # Each sample's GPU temperature follows from its seq: a scrape that mixed two samples
        # would show a temperature that does not belong to the seq beside it.
        message = _sample(host, seq=seq)
        message.gpus[0].temperature_celsius = 30 + seq % 50
        return message

    exporter.update(sample(1))
    done = threading.Event()
    # The seq being handed to the exporter, and the last one it has taken: a scrape must show
    # a seq between what was taken before it began and what was being handed over when it ended.
    handing, taken = [1], [1]

    def keep_updating() -> None:
        seq = 1
        while not done.is_set():
            seq += 1
            handing[0] = seq
            exporter.update(sample(seq))
            taken[0] = seq

    updater = threading.Thread(target=keep_updating)
    updater.start()
    scraped = []
    try:
        for _ in range(50):
            low = taken[0]
            samples, _ = _scrape(registry)
            high = handing[0]
            seq = int(_value(samples, "sentinel_agent_telemetry_seq"))
            assert low <= seq <= high
            gpu0 = {"gpu": "0", "UUID": UUID_0, "device": "nvidia0", "Hostname": "gpu-node-7"}
            assert _value(samples, "DCGM_FI_DEV_GPU_TEMP", **gpu0) == 30 + seq % 50
            scraped.append(seq)
    finally:
        done.set()
        updater.join()
    assert scraped == sorted(scraped)  # a later scrape never shows an older sample
    assert scraped[-1] > 1  # the updates did run while scraping
