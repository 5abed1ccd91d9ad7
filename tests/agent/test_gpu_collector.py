"""GPU collection through NVML: readings, unsupported fields, lost GPUs, XID events, hung calls.

This machine has no NVIDIA GPU, and the GPU is the one thing these tests fake: they replace NVML's
entry points in the REAL `pynvml` module with pytest's monkeypatch, raising NVML's own error
classes and returning pynvml's own ctypes structs, so everything above the driver runs for real.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time

import pynvml
import pytest

from nodeagent.collectors import (
    AsyncGpuCollector,
    GpuCollectionState,
    GpuCollector,
    GpuEventKind,
)
from tests.fakenvml import FakeNvml
from tests.fakenvml import h100 as _h100

OK = GpuCollectionState.OK
NO_GPU = GpuCollectionState.NO_GPU
ERROR = GpuCollectionState.ERROR
TIMEOUT = GpuCollectionState.TIMEOUT

NO_DRIVER_MESSAGE = "NVIDIA driver not found (NVML library not loaded): no GPU telemetry"


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml([_h100(0), _h100(1)])
    fake.install(monkeypatch)
    return fake


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_two_gpus_are_read_field_by_field(nvml: FakeNvml) -> None:
    collector = GpuCollector()
    status = collector.start()
    assert status.state == OK
    assert (status.driver_version, status.nvml_version) == ("550.90.07", "12.550.90.07")
    assert nvml.registered_for_xid == [0, 1]

    reading = collector.collect()

    assert reading.status.state == OK
    assert reading.events == ()
    assert [gpu.index for gpu in reading.gpus] == [0, 1]
    for gpu, board in zip(reading.gpus, nvml.gpus, strict=True):
        assert gpu.uuid == board.uuid
        assert (gpu.utilization_gpu_percent, gpu.utilization_memory_percent) == (87, 42)
        assert gpu.memory_total_bytes == board.memory_total
        # v2 memory info: "used" excludes what the driver reserves.
        assert gpu.memory_used_bytes == board.memory_used
        assert gpu.memory_reserved_bytes == board.memory_reserved
        assert gpu.memory_free_bytes == board.memory_free
        assert (gpu.sm_clock_mhz, gpu.memory_clock_mhz, gpu.graphics_clock_mhz) == (
            1980,
            2619,
            1975,
        )
        assert gpu.temperature_celsius == 41
        assert gpu.power_usage_milliwatts == 312_456
        assert gpu.power_limit_milliwatts == 700_000
        assert gpu.total_energy_millijoules == 123_456_789_012
        assert gpu.throttle_reasons == pynvml.nvmlClocksEventReasonSwPowerCap
        assert (gpu.ecc_corrected_volatile, gpu.ecc_uncorrected_volatile) == (3, 0)
        assert gpu.remapped_rows_correctable == 2
        assert gpu.remapped_rows_uncorrectable == 0
        assert not gpu.remapped_rows_pending
        assert (gpu.pcie_tx_kbps, gpu.pcie_rx_kbps) == (1200, 3400)
        assert gpu.last_xid == 0
        assert list(gpu.unsupported) == ["fan_speed_percent"]
        assert gpu.fan_speed_percent == 0


def test_inventory_names_each_gpu(nvml: FakeNvml) -> None:
    collector = GpuCollector()
    collector.start()

    inventory = collector.inventory()

    assert [gpu.index for gpu in inventory] == [0, 1]
    first = inventory[0]
    assert first.uuid == nvml.gpus[0].uuid
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.pci_bus_id == "00000000:18:00.0"
    assert first.serial == "1653220012340"
    assert first.vbios_version == "96.00.89.00.01"
    assert first.driver_version == "550.90.07"
    assert first.memory_total_bytes == 85_520_809_984
    assert (first.power_limit_min_milliwatts, first.power_limit_max_milliwatts) == (
        200_000,
        700_000,
    )
    assert first.power_limit_default_milliwatts == 700_000
    assert first.mig_mode == "Disabled"


def test_mig_mode_is_empty_where_unsupported_and_enabled_where_on(nvml: FakeNvml) -> None:
    nvml.gpus[0].failures["nvmlDeviceGetMigMode"] = pynvml.NVMLError_NotSupported()
    nvml.gpus[1].mig_mode = (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)
    collector = GpuCollector()
    collector.start()

    assert [gpu.mig_mode for gpu in collector.inventory()] == ["", "Enabled"]


def test_unsupported_fields_are_named_and_the_rest_is_read(nvml: FakeNvml) -> None:
    board = nvml.gpus[1]
    board.failures.update(
        {
            "nvmlDeviceGetTotalEccErrors": pynvml.NVMLError_NotSupported(),
            "nvmlDeviceGetRemappedRows": pynvml.NVMLError_NotSupported(),
            "nvmlDeviceGetTotalEnergyConsumption": pynvml.NVMLError_NoPermission(),
        }
    )
    collector = GpuCollector()
    collector.start()

    gpu = collector.collect().gpus[1]

    assert set(gpu.unsupported) == {
        "ecc_corrected_volatile",
        "ecc_uncorrected_volatile",
        "remapped_rows_correctable",
        "remapped_rows_uncorrectable",
        "remapped_rows_pending",
        "total_energy_millijoules",
        "fan_speed_percent",
    }
    assert (gpu.ecc_corrected_volatile, gpu.total_energy_millijoules) == (0, 0)
    assert gpu.temperature_celsius == 41
    assert gpu.memory_used_bytes == board.memory_used
    assert gpu.power_usage_milliwatts == 312_456


def test_throttle_reasons_fall_back_to_the_older_nvml_call(nvml: FakeNvml) -> None:
    nvml.gpus[0].failures["nvmlDeviceGetCurrentClocksEventReasons"] = (
        pynvml.NVMLError_FunctionNotFound()
    )
    nvml.gpus[0].clocks_event_reasons = pynvml.nvmlClocksThrottleReasonHwThermalSlowdown
    collector = GpuCollector()
    collector.start()

    gpu = collector.collect().gpus[0]

    assert gpu.throttle_reasons == pynvml.nvmlClocksThrottleReasonHwThermalSlowdown
    assert "throttle_reasons" not in gpu.unsupported


def test_a_lost_gpu_is_reported_once_and_the_others_still_report(nvml: FakeNvml) -> None:
    collector = GpuCollector()
    collector.start()
    nvml.gpus[1].lost = True

    first = collector.collect()
    second = collector.collect()

    assert [gpu.index for gpu in first.gpus] == [0]
    assert first.gpus[0].temperature_celsius == 41
    assert first.status.state == ERROR
    assert "GPU 1" in first.status.message
    assert nvml.gpus[1].uuid in first.status.message
    [lost] = first.events
    assert lost.kind == GpuEventKind.LOST
    assert (lost.gpu_index, lost.gpu_uuid) == (1, nvml.gpus[1].uuid)
    assert lost.time_ns > 0

    assert [gpu.index for gpu in second.gpus] == [0]
    assert second.status.state == ERROR
    assert second.events == ()
    assert [gpu.index for gpu in collector.inventory()] == [0]


def test_xid_events_are_drained_into_events_and_last_xid(nvml: FakeNvml) -> None:
    collector = GpuCollector()
    collector.start()
    nvml.pending_xids.append((1, 48))

    first = collector.collect()
    second = collector.collect()

    [xid] = first.events
    assert xid.kind == GpuEventKind.XID
    assert xid.xid == 48
    assert (xid.gpu_index, xid.gpu_uuid) == (1, nvml.gpus[1].uuid)
    assert abs(xid.time_ns / 1e9 - time.time()) < 60
    assert [gpu.last_xid for gpu in first.gpus] == [0, 48]
    assert nvml.pending_xids == []
    assert second.events == ()
    assert [gpu.last_xid for gpu in second.gpus] == [0, 48]


def test_a_row_remapping_failure_is_reported_once(nvml: FakeNvml) -> None:
    nvml.gpus[0].remapped_rows = (0, 1, 0, 1)
    collector = GpuCollector()
    collector.start()

    first = collector.collect()
    second = collector.collect()

    [event] = first.events
    assert event.kind == GpuEventKind.ECC
    assert event.gpu_index == 0
    assert first.gpus[0].remapped_rows_uncorrectable == 1
    assert second.events == ()


def test_without_driver_no_gpu_is_reported_and_start_is_retried_rarely(
    nvml: FakeNvml,
) -> None:
    nvml.init_error = pynvml.NVMLError_LibraryNotFound()
    now = [1000.0]
    collector = GpuCollector(retry_interval=300.0, clock=lambda: now[0])

    status = collector.start()
    readings = [collector.collect() for _ in range(3)]

    assert status.state == NO_GPU
    assert status.message == NO_DRIVER_MESSAGE
    for reading in readings:
        assert reading.status.state == NO_GPU
        assert reading.status.message == NO_DRIVER_MESSAGE
        assert (reading.gpus, reading.events) == ((), ())
    assert collector.inventory() == []
    assert nvml.init_calls == 1

    # The driver gets installed; the next retry picks it up.
    nvml.init_error = None
    now[0] += 299.0
    assert collector.collect().status.state == NO_GPU
    now[0] += 2.0
    reading = collector.collect()
    assert reading.status.state == OK
    assert len(reading.gpus) == 2
    assert nvml.init_calls == 2


@pytest.mark.parametrize(
    ("error", "state", "words"),
    [
        (pynvml.NVMLError_DriverNotLoaded(), NO_GPU, "driver not loaded"),
        (pynvml.NVMLError_NoPermission(), ERROR, "no permission"),
        (pynvml.NVMLError_LibRmVersionMismatch(), ERROR, "versions differ"),
        (pynvml.NVMLError_Unknown(), ERROR, "Unknown Error"),
    ],
)
def test_nvml_init_failures_say_why_in_plain_words(
    nvml: FakeNvml, error: pynvml.NVMLError, state: GpuCollectionState, words: str
) -> None:
    nvml.init_error = error

    status = GpuCollector().start()

    assert status.state == state
    assert words in status.message


def test_a_driver_without_gpus_reports_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([])
    nvml.install(monkeypatch)
    collector = GpuCollector()

    status = collector.start()

    assert (status.state, status.message) == (NO_GPU, "no NVIDIA GPU found")
    assert status.driver_version == "550.90.07"
    assert nvml.shutdown_calls == 1
    assert collector.collect().gpus == ()


def test_stop_shuts_nvml_down(nvml: FakeNvml) -> None:
    collector = GpuCollector()
    collector.start()

    collector.stop()

    assert nvml.shutdown_calls == 1


async def test_a_hung_nvml_call_times_out_fails_fast_and_recovers(nvml: FakeNvml) -> None:
    collector = AsyncGpuCollector(GpuCollector(), call_timeout=0.5)
    release = threading.Event()
    try:
        assert (await collector.start()).state == OK
        nvml.pending_xids.append((0, 13))
        nvml.hang = release

        started = time.monotonic()
        timed_out = await collector.collect()
        first_wait = time.monotonic() - started
        started = time.monotonic()
        refused = await collector.collect()
        second_wait = time.monotonic() - started

        assert timed_out.status.state == TIMEOUT
        assert "did not return within 0.5s" in timed_out.status.message
        assert timed_out.status.driver_version == "550.90.07"
        assert timed_out.gpus == ()
        assert 0.4 <= first_wait < 2.0
        assert refused.status.state == TIMEOUT
        assert "previous NVML call still running" in refused.status.message
        assert second_wait < 0.2

        nvml.hang = None
        release.set()
        for _ in range(200):
            if collector.runner.in_flight_seconds is None:
                break
            await asyncio.sleep(0.01)
        recovered = await collector.collect()

        assert recovered.status.state == OK
        assert len(recovered.gpus) == 2
        # The stuck call had drained this XID; it is delivered late, not lost.
        assert [event.xid for event in recovered.events] == [13]
    finally:
        release.set()
        await collector.stop()


async def test_the_async_collector_reads_inventory_and_telemetry(nvml: FakeNvml) -> None:
    collector = AsyncGpuCollector(call_timeout=5.0)
    try:
        await collector.start()
        inventory = await collector.inventory()
        reading = await collector.collect()
    finally:
        await collector.stop()

    assert [gpu.uuid for gpu in inventory] == [gpu.uuid for gpu in nvml.gpus]
    assert reading.status.state == OK
    assert [gpu.temperature_celsius for gpu in reading.gpus] == [41, 41]
    assert nvml.shutdown_calls == 1


@pytest.mark.skipif(_nvml_library_present(), reason="this machine has an NVIDIA driver")
async def test_real_nvml_on_a_machine_without_driver_reports_no_gpu() -> None:
    collector = AsyncGpuCollector()
    try:
        status = await collector.start()
        reading = await collector.collect()
        inventory = await collector.inventory()
    finally:
        await collector.stop()

    assert (status.state, status.message) == (NO_GPU, NO_DRIVER_MESSAGE)
    assert (reading.status.state, reading.status.message) == (NO_GPU, NO_DRIVER_MESSAGE)
    assert (reading.gpus, reading.events, inventory) == ((), (), [])


@pytest.mark.skipif(not _nvml_library_present(), reason="needs an NVIDIA driver")
def test_real_nvml_reads_the_gpus_of_this_machine() -> None:
    collector = GpuCollector()
    try:
        status = collector.start()
        if status.state != OK:
            pytest.skip(f"NVML present but unusable here: {status.message}")
        inventory = collector.inventory()
        reading = collector.collect()
    finally:
        collector.stop()

    assert inventory
    assert all(gpu.uuid.startswith(("GPU-", "MIG-")) for gpu in inventory)
    assert reading.status.state == OK
    assert [gpu.uuid for gpu in reading.gpus] == [gpu.uuid for gpu in inventory]
    for gpu in reading.gpus:
        assert gpu.memory_total_bytes > 0
        assert gpu.memory_used_bytes <= gpu.memory_total_bytes
