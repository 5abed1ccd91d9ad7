"""A GPU's health report for a person diagnosing the node: modes, ECC counters, retired pages,
remapped rows and throttle reasons by name, as JSON-ready values.
"""

from __future__ import annotations

from typing import Any

from nodeagent.collectors._nvml import Device, DeviceReader, text
from nodeagent.collectors._pynvml import pynvml

# Clock-event ("throttle") reason bits in the order nvidia-smi lists them, with stable names.
_THROTTLE_REASONS: tuple[tuple[str, str], ...] = (
    ("gpu_idle", "nvmlClocksEventReasonGpuIdle"),
    ("applications_clocks_setting", "nvmlClocksEventReasonApplicationsClocksSetting"),
    ("sw_power_cap", "nvmlClocksEventReasonSwPowerCap"),
    ("hw_slowdown", "nvmlClocksEventReasonHwSlowdown"),
    ("sync_boost", "nvmlClocksEventReasonSyncBoost"),
    ("sw_thermal_slowdown", "nvmlClocksEventReasonSwThermalSlowdown"),
    ("hw_thermal_slowdown", "nvmlClocksEventReasonHwThermalSlowdown"),
    ("hw_power_brake_slowdown", "nvmlClocksEventReasonHwPowerBrakeSlowdown"),
    ("display_clock_setting", "nvmlClocksEventReasonDisplayClockSetting"),
)


def _enabled(state: Any) -> str:
    return "Enabled" if int(state) == pynvml.NVML_FEATURE_ENABLED else "Disabled"


def _throttle_reason_names(bits: int) -> list[str]:
    names = [name for name, constant in _THROTTLE_REASONS if bits & getattr(pynvml, constant, 0)]
    known = 0
    for _name, constant in _THROTTLE_REASONS:
        known |= getattr(pynvml, constant, 0)
    if bits & ~known:
        names.append(f"other:{bits & ~known:#x}")
    return names


def read_diagnostics(device: Device) -> dict[str, Any]:
    """One GPU's report; what NVML cannot read is left out and named in `unsupported`.

    Raises `GpuLost` when the GPU has fallen off the bus.
    """
    reader = DeviceReader(device)
    report: dict[str, Any] = {"index": device.index, "uuid": device.uuid}
    name = reader.read("name", "nvmlDeviceGetName")
    if name is not None:
        report["name"] = text(name)
    pci = reader.read("pci_bus_id", "nvmlDeviceGetPciInfo")
    if pci is not None:
        report["pci_bus_id"] = text(pci.busId)
    temperature = reader.read(
        "temperature_celsius", "nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU
    )
    if temperature is not None:
        report["temperature_celsius"] = int(temperature)
    for field, function in (
        ("power_usage_watts", "nvmlDeviceGetPowerUsage"),
        ("power_limit_watts", "nvmlDeviceGetEnforcedPowerLimit"),
    ):
        milliwatts = reader.read(field, function)
        if milliwatts is not None:
            report[field] = int(milliwatts) / 1000
    persistence = reader.read("persistence_mode", "nvmlDeviceGetPersistenceMode")
    if persistence is not None:
        report["persistence_mode"] = _enabled(persistence)
    ecc_mode = reader.read("ecc_mode", "nvmlDeviceGetEccMode")
    if ecc_mode is not None:
        report["ecc_mode"] = {
            "current": _enabled(ecc_mode[0]),
            "pending": _enabled(ecc_mode[1]),
        }
    ecc_errors: dict[str, int] = {}
    for kind, error_type in (
        ("corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        ("uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
    ):
        for scope, counter in (
            ("volatile", pynvml.NVML_VOLATILE_ECC),
            ("aggregate", pynvml.NVML_AGGREGATE_ECC),
        ):
            field = f"ecc_errors.{kind}_{scope}"
            count = reader.read(field, "nvmlDeviceGetTotalEccErrors", error_type, counter)
            if count is not None:
                ecc_errors[f"{kind}_{scope}"] = int(count)
    if ecc_errors:
        report["ecc_errors"] = ecc_errors
    retired: dict[str, Any] = {}
    for kind, cause in (
        ("single_bit_ecc", pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
        ("double_bit_ecc", pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
    ):
        pages = reader.read(f"retired_pages.{kind}", "nvmlDeviceGetRetiredPages", cause)
        if pages is not None:
            retired[kind] = len(pages)
    pending_retirement = reader.read(
        "retired_pages.pending", "nvmlDeviceGetRetiredPagesPendingStatus"
    )
    if pending_retirement is not None:
        retired["pending"] = bool(pending_retirement)
    if retired:
        report["retired_pages"] = retired
    rows = reader.read("remapped_rows", "nvmlDeviceGetRemappedRows")
    if rows is not None:
        correctable, uncorrectable, pending, failure = rows
        report["remapped_rows"] = {
            "correctable": int(correctable),
            "uncorrectable": int(uncorrectable),
            "pending": bool(pending),
            "failed": bool(failure),
        }
    reasons = reader.read(
        "throttle_reasons",
        "nvmlDeviceGetCurrentClocksEventReasons",
        fallback="nvmlDeviceGetCurrentClocksThrottleReasons",
    )
    if reasons is not None:
        report["throttle_reasons"] = _throttle_reason_names(int(reasons))
    report["last_xid"] = device.last_xid
    report["unsupported"] = reader.unsupported
    return report
