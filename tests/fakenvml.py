"""A fake NVIDIA driver for tests: NVML's entry points in the REAL `pynvml` module are replaced
(pytest's monkeypatch) by methods that answer with pynvml's own ctypes structs and raise NVML's
own error classes, so everything above the driver runs for real on a machine without a GPU."""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from typing import Any

import pynvml
import pytest

DRIVER_VERSION = "550.90.07"
NVML_VERSION = "12.550.90.07"


@dataclasses.dataclass
class FakeGpu:
    """What one H100 SXM board answers through NVML (fan speed: not supported, as on real ones)."""

    uuid: str
    pci_bus_id: str
    serial: str
    name: str = "NVIDIA H100 80GB HBM3"
    vbios: str = "96.00.89.00.01"
    memory_total: int = 85_520_809_984
    memory_reserved: int = 547_749_888
    memory_used: int = 40_000_000_000
    utilization: tuple[int, int] = (87, 42)
    clocks: dict[int, int] = dataclasses.field(
        default_factory=lambda: {
            pynvml.NVML_CLOCK_SM: 1980,
            pynvml.NVML_CLOCK_MEM: 2619,
            pynvml.NVML_CLOCK_GRAPHICS: 1975,
        }
    )
    temperature: int = 41
    power_usage: int = 312_456
    # The management limit; as on a board with no other cap, also the enforced one.
    power_limit: int = 700_000
    power_limit_range: tuple[int, int] = (200_000, 700_000)
    power_limit_default: int = 700_000
    energy: int = 123_456_789_012
    clocks_event_reasons: int = pynvml.nvmlClocksEventReasonSwPowerCap
    ecc: dict[int, int] = dataclasses.field(
        default_factory=lambda: {
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 3,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 0,
        }
    )
    ecc_aggregate: dict[int, int] = dataclasses.field(
        default_factory=lambda: {
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 17,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 0,
        }
    )
    ecc_mode: tuple[int, int] = (pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED)
    persistence_mode: int = pynvml.NVML_FEATURE_ENABLED
    # Page retirement cause → retired page addresses (H100s remap rows instead: none here).
    retired_pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    retired_pages_pending: int = pynvml.NVML_FEATURE_DISABLED
    remapped_rows: tuple[int, int, int, int] = (2, 0, 0, 0)
    pcie: dict[int, int] = dataclasses.field(
        default_factory=lambda: {
            pynvml.NVML_PCIE_UTIL_TX_BYTES: 1200,
            pynvml.NVML_PCIE_UTIL_RX_BYTES: 3400,
        }
    )
    mig_mode: tuple[int, int] = (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE)
    # NVML function name → the NVML error it raises for this board.
    failures: dict[str, pynvml.NVMLError] = dataclasses.field(default_factory=dict)
    lost: bool = False

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_reserved - self.memory_used


def h100(index: int) -> FakeGpu:
    """GPU `index` of an eight-way H100 SXM node."""
    return FakeGpu(
        uuid=f"GPU-3b2f7a10-5c1e-4d8a-9f00-00000000000{index}",
        pci_bus_id=f"00000000:{0x18 + index:02X}:00.0",
        serial=f"165322001234{index}",
        failures={"nvmlDeviceGetFanSpeed": pynvml.NVMLError_NotSupported()},
    )


class FakeNvml:
    """Stands in for libnvidia-ml behind pynvml's Python functions."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        # Real pynvml handle types: opaque pointers, one distinct address per board.
        self._boards = [pynvml.struct_c_nvmlDevice_t() for _ in gpus]
        self.handles = [pynvml.c_nvmlDevice_t(board) for board in self._boards]
        self._event_set = pynvml.c_nvmlEventSet_t(pynvml.struct_c_nvmlEventSet_t())
        self.init_error: pynvml.NVMLError | None = None
        self.init_calls = 0
        self.shutdown_calls = 0
        self.registered_for_xid: list[int] = []
        self.pending_xids: list[tuple[int, int]] = []
        self.driver_version = DRIVER_VERSION
        # Every accepted nvmlDeviceSetPowerManagementLimit: (GPU index, milliwatts).
        self.power_limit_sets: list[tuple[int, int]] = []
        # While set, every device call blocks until the event is set: a wedged driver.
        self.hang: threading.Event | None = None
        # NVML function name → event it blocks on until set: one call that wedges.
        self.hangs: dict[str, threading.Event] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in dir(type(self)):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _board(self, handle: Any, function: str) -> FakeGpu:
        address = ctypes.addressof(handle.contents)
        index = next(
            i for i, h in enumerate(self.handles) if ctypes.addressof(h.contents) == address
        )
        hang = self.hang or self.hangs.get(function)
        if hang is not None:
            hang.wait(timeout=60)
        gpu = self.gpus[index]
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if function in gpu.failures:
            raise gpu.failures[function]
        return gpu

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        return NVML_VERSION

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if index >= len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return self.handles[index]

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._board(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._board(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return self._board(handle, "nvmlDeviceGetSerial").serial

    def nvmlDeviceGetVbiosVersion(self, handle: Any) -> str:
        return self._board(handle, "nvmlDeviceGetVbiosVersion").vbios

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        gpu = self._board(handle, "nvmlDeviceGetPciInfo")
        info = pynvml.nvmlPciInfo_t()
        info.busId = gpu.pci_bus_id.encode()
        info.busIdLegacy = gpu.pci_bus_id.encode()
        return info

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        gpu = self._board(handle, "nvmlDeviceGetMemoryInfo")
        if version == pynvml.nvmlMemory_v2:
            return pynvml.c_nvmlMemory_v2_t(
                version=version,
                total=gpu.memory_total,
                reserved=gpu.memory_reserved,
                free=gpu.memory_free,
                used=gpu.memory_used,
            )
        # v1, as real drivers do, counts reserved memory as used.
        return pynvml.c_nvmlMemory_t(
            total=gpu.memory_total,
            free=gpu.memory_free,
            used=gpu.memory_used + gpu.memory_reserved,
        )

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        gpu = self._board(handle, "nvmlDeviceGetPowerManagementLimitConstraints")
        return list(gpu.power_limit_range)

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetPowerManagementLimit").power_limit

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, milliwatts: int) -> None:
        gpu = self._board(handle, "nvmlDeviceSetPowerManagementLimit")
        low, high = gpu.power_limit_range
        if not low <= milliwatts <= high:
            raise pynvml.NVMLError_InvalidArgument()
        gpu.power_limit = milliwatts
        self.power_limit_sets.append((self.gpus.index(gpu), milliwatts))

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetPowerManagementDefaultLimit").power_limit_default

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        return list(self._board(handle, "nvmlDeviceGetMigMode").mig_mode)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._board(handle, "nvmlDeviceGetUtilizationRates")
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization[0], memory=gpu.utilization[1])

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int:
        return self._board(handle, "nvmlDeviceGetClockInfo").clocks[clock]

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._board(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetPowerUsage").power_usage

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetTotalEnergyConsumption").energy

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetCurrentClocksEventReasons").clocks_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        gpu = self._board(handle, "nvmlDeviceGetCurrentClocksThrottleReasons")
        return gpu.clocks_event_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        gpu = self._board(handle, "nvmlDeviceGetTotalEccErrors")
        if counter == pynvml.NVML_AGGREGATE_ECC:
            return gpu.ecc_aggregate[error_type]
        assert counter == pynvml.NVML_VOLATILE_ECC
        return gpu.ecc[error_type]

    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        return list(self._board(handle, "nvmlDeviceGetEccMode").ecc_mode)

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetPersistenceMode").persistence_mode

    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> list[int]:
        return list(self._board(handle, "nvmlDeviceGetRetiredPages").retired_pages.get(cause, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        return self._board(handle, "nvmlDeviceGetRetiredPagesPendingStatus").retired_pages_pending

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return self._board(handle, "nvmlDeviceGetRemappedRows").remapped_rows

    def nvmlDeviceGetFanSpeed(self, handle: Any) -> int:
        self._board(handle, "nvmlDeviceGetFanSpeed")
        return 30

    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: int) -> int:
        return self._board(handle, "nvmlDeviceGetPcieThroughput").pcie[counter]

    def nvmlEventSetCreate(self) -> Any:
        return self._event_set

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None:
        self._board(handle, "nvmlDeviceRegisterEvents")
        assert event_types & pynvml.nvmlEventTypeXidCriticalError
        self.registered_for_xid.append(self.handles.index(handle))

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        if not self.pending_xids:
            raise pynvml.NVMLError_Timeout()
        index, xid = self.pending_xids.pop(0)
        data = pynvml.c_nvmlEventData_t()
        data.device = self.handles[index]
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        data.eventData = xid
        return data

    def nvmlEventSetFree(self, event_set: Any) -> None:
        pass
