"""What the agent reads from each GPU on every collection (utilization, memory, clocks, power,
ECC, remapped rows, ...) and once per start (its inventory), field by field through NVML.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from nodeagent.collectors._nvml import Device, DeviceReader, event_now, text
from nodeagent.collectors._pynvml import pynvml
from nodeagent.collectors._values import GpuEvent, GpuEventKind, GpuInventoryItem, GpuMetrics

_log = logging.getLogger(__name__)

_UTILIZATION_FIELDS = ("utilization_gpu_percent", "utilization_memory_percent")
_MEMORY_FIELDS = (
    "memory_total_bytes",
    "memory_used_bytes",
    "memory_free_bytes",
    "memory_reserved_bytes",
)
_REMAPPED_ROWS_FIELDS = (
    "remapped_rows_correctable",
    "remapped_rows_uncorrectable",
    "remapped_rows_pending",
)


# GpuMetrics fields that are one NVML call each: (field, NVML function, its arguments after the
# device handle). Functions are looked up by name at call time, so an older pynvml without one
# reports the field unsupported instead of failing. Built at first use: the arguments are pynvml
# constants, and importing pynvml waits until there is a GPU to read.
@functools.cache
def _scalar_fields() -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return (
        ("sm_clock_mhz", "nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_SM,)),
        ("memory_clock_mhz", "nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_MEM,)),
        ("graphics_clock_mhz", "nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_GRAPHICS,)),
        ("temperature_celsius", "nvmlDeviceGetTemperature", (pynvml.NVML_TEMPERATURE_GPU,)),
        ("power_usage_milliwatts", "nvmlDeviceGetPowerUsage", ()),
        ("power_limit_milliwatts", "nvmlDeviceGetEnforcedPowerLimit", ()),
        ("total_energy_millijoules", "nvmlDeviceGetTotalEnergyConsumption", ()),
        (
            "ecc_corrected_volatile",
            "nvmlDeviceGetTotalEccErrors",
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
        ),
        (
            "ecc_uncorrected_volatile",
            "nvmlDeviceGetTotalEccErrors",
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
        ),
        ("fan_speed_percent", "nvmlDeviceGetFanSpeed", ()),
        ("pcie_tx_kbps", "nvmlDeviceGetPcieThroughput", (pynvml.NVML_PCIE_UTIL_TX_BYTES,)),
        ("pcie_rx_kbps", "nvmlDeviceGetPcieThroughput", (pynvml.NVML_PCIE_UTIL_RX_BYTES,)),
    )


def read_metrics(device: Device, events: list[GpuEvent]) -> GpuMetrics:
    """One GPU's readings; appends to `events` what the reading shows for the first time.

    Raises `GpuLost` when the GPU has fallen off the bus.
    """
    reader = DeviceReader(device)
    values: dict[str, int] = {}
    utilization = reader.read(_UTILIZATION_FIELDS, "nvmlDeviceGetUtilizationRates")
    if utilization is not None:
        values["utilization_gpu_percent"] = int(utilization.gpu)
        values["utilization_memory_percent"] = int(utilization.memory)
    # v2: the v1 call counts memory reserved by the driver as "used".
    memory = reader.read(_MEMORY_FIELDS, "nvmlDeviceGetMemoryInfo", version=pynvml.nvmlMemory_v2)
    if memory is not None:
        values["memory_total_bytes"] = int(memory.total)
        values["memory_used_bytes"] = int(memory.used)
        values["memory_free_bytes"] = int(memory.free)
        values["memory_reserved_bytes"] = int(memory.reserved)
    for field, function, args in _scalar_fields():
        value = reader.read(field, function, *args)
        if value is not None:
            values[field] = int(value)
    reasons = reader.read(
        "throttle_reasons",
        "nvmlDeviceGetCurrentClocksEventReasons",
        fallback="nvmlDeviceGetCurrentClocksThrottleReasons",
    )
    if reasons is not None:
        values["throttle_reasons"] = int(reasons)
    remapped_rows_pending = False
    rows = reader.read(_REMAPPED_ROWS_FIELDS, "nvmlDeviceGetRemappedRows")
    if rows is not None:
        correctable, uncorrectable, pending, failure = rows
        values["remapped_rows_correctable"] = int(correctable)
        values["remapped_rows_uncorrectable"] = int(uncorrectable)
        remapped_rows_pending = bool(pending)
        if failure and not device.remap_failure_reported:
            events.append(_remap_failure(device))
    return GpuMetrics(
        index=device.index,
        uuid=device.uuid,
        remapped_rows_pending=remapped_rows_pending,
        last_xid=device.last_xid,
        unsupported=tuple(reader.unsupported),
        **values,
    )


def _remap_failure(device: Device) -> GpuEvent:
    # GpuMetrics has no field for it, yet it means the board needs service: say it once.
    device.remap_failure_reported = True
    message = f"row remapping failed on {device.label}: its memory errors cannot be remapped"
    _log.warning("%s", message)
    return event_now(GpuEventKind.ECC, message, device)


def read_inventory(device: Device, driver_version: str) -> GpuInventoryItem:
    """What the GPU is; a field NVML cannot read is left empty.

    Raises `GpuLost` when the GPU has fallen off the bus.
    """
    reader = DeviceReader(device)
    values: dict[str, Any] = {}
    for field, function in (
        ("name", "nvmlDeviceGetName"),
        ("serial", "nvmlDeviceGetSerial"),
        ("vbios_version", "nvmlDeviceGetVbiosVersion"),
    ):
        value = reader.read(field, function)
        if value is not None:
            values[field] = text(value)
    pci = reader.read("pci_bus_id", "nvmlDeviceGetPciInfo")
    if pci is not None:
        values["pci_bus_id"] = text(pci.busId)
    memory = reader.read(
        "memory_total_bytes", "nvmlDeviceGetMemoryInfo", version=pynvml.nvmlMemory_v2
    )
    if memory is not None:
        values["memory_total_bytes"] = int(memory.total)
    limits = reader.read(
        ("power_limit_min_milliwatts", "power_limit_max_milliwatts"),
        "nvmlDeviceGetPowerManagementLimitConstraints",
    )
    if limits is not None:
        values["power_limit_min_milliwatts"] = int(limits[0])
        values["power_limit_max_milliwatts"] = int(limits[1])
    default_limit = reader.read(
        "power_limit_default_milliwatts", "nvmlDeviceGetPowerManagementDefaultLimit"
    )
    if default_limit is not None:
        values["power_limit_default_milliwatts"] = int(default_limit)
    mig = reader.read("mig_mode", "nvmlDeviceGetMigMode")
    if mig is not None:
        current_mode = mig[0]
        values["mig_mode"] = (
            "Enabled" if current_mode == pynvml.NVML_DEVICE_MIG_ENABLE else "Disabled"
        )
    return GpuInventoryItem(
        index=device.index, uuid=device.uuid, driver_version=driver_version, **values
    )
