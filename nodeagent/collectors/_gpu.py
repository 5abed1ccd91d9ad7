"""GPU inventory, telemetry, XID events, diagnostics and power limits from NVML (the `pynvml`
module of nvidia-ml-py).

`GpuCollector` blocks and must stay on one thread; `AsyncGpuCollector` drives it through a
`DeadlineRunner`, so a hung driver call yields a TIMEOUT reading instead of a stalled agent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, TypeVarTuple

import pynvml
from sentinel.v1 import agent_pb2, fleet_pb2, telemetry_pb2

from nodeagent.collectors._deadline import CollectorTimeout, DeadlineRunner

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

_OK = telemetry_pb2.GPU_COLLECTION_STATE_OK
_NO_GPU = telemetry_pb2.GPU_COLLECTION_STATE_NO_GPU
_ERROR = telemetry_pb2.GPU_COLLECTION_STATE_ERROR
_TIMEOUT = telemetry_pb2.GPU_COLLECTION_STATE_TIMEOUT

# An XID storm must not keep one collect() draining forever; the rest waits for the next call.
_MAX_EVENTS_PER_COLLECT = 256

# How many recent XID events a diagnostic report can show; older ones were already sent as
# events, so the ring only has to answer "what happened lately".
RECENT_XID_EVENTS = 64

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

# GpuTelemetry fields that are one NVML call each: (proto field, NVML function, its arguments
# after the device handle). Functions are looked up by name at call time, so an older pynvml
# without one reports the field unsupported instead of failing.
_SCALAR_FIELDS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
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


@dataclasses.dataclass(frozen=True)
class GpuReading:
    """One GPU collection: why `gpus` is what it is, the GPUs read, and new events."""

    status: telemetry_pb2.GpuCollectionStatus
    """State and a person-readable message; driver and NVML versions once known."""
    gpus: list[telemetry_pb2.GpuTelemetry] = dataclasses.field(default_factory=list)
    """The GPUs that answered; lost GPUs are left out (and named in `status`)."""
    events: list[agent_pb2.AgentEvent] = dataclasses.field(default_factory=list)
    """XID, GPU-lost and ECC events seen since the previous reading, each reported once."""


class GpuUnavailable(Exception):
    """NVML is not running: no driver, no GPU, or NVML refused to start (see `status`)."""

    def __init__(self, status: telemetry_pb2.GpuCollectionStatus) -> None:
        super().__init__(status.message)
        self.status = status

    @property
    def no_gpu(self) -> bool:
        """True when the node has no driver or no board, as opposed to a broken NVML."""
        return self.status.state == _NO_GPU


class UnknownGpu(Exception):
    """A GPU index this node does not have."""

    def __init__(self, index: int, count: int) -> None:
        have = f"GPUs 0-{count - 1}" if count > 1 else "GPU 0" if count == 1 else "no GPU"
        super().__init__(f"no GPU {index} on this node (it has {have})")
        self.index = index
        self.count = count


class GpuCallFailed(Exception):
    """An NVML call on one GPU failed, or the GPU is lost; the message names both."""

    def __init__(self, message: str, error: pynvml.NVMLError | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclasses.dataclass(frozen=True, slots=True)
class PowerLimit:
    """One GPU's power management limit and the range NVML accepts for it, in milliwatts."""

    index: int
    uuid: str
    milliwatts: int
    min_milliwatts: int
    max_milliwatts: int


class _GpuLost(Exception):
    def __init__(self, error: pynvml.NVMLError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass
class _Device:
    index: int
    handle: Any
    uuid: str = ""
    # Set once the device cannot be read any more (lost, or its handle could not be opened).
    failure: str | None = None
    last_xid: int = 0
    remap_failure_reported: bool = False

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.uuid})" if self.uuid else f"GPU {self.index}"

    @property
    def address(self) -> int | None:
        return _handle_address(self.handle)


def _handle_address(handle: Any) -> int | None:
    """The pointer value of an NVML device handle; event data carries a copy of the pointer."""
    try:
        address: int | None = ctypes.cast(handle, ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return None
    return address


def _text(value: object) -> str:
    # pynvml returns str on Python 3, but some structs and older releases hand out bytes.
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


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


def _now_event(kind: agent_pb2.AgentEventKind.ValueType, message: str) -> agent_pb2.AgentEvent:
    event = agent_pb2.AgentEvent(kind=kind, message=message)
    event.event_time.FromNanoseconds(time.time_ns())
    return event


def _status_for_init_error(error: pynvml.NVMLError) -> telemetry_pb2.GpuCollectionStatus:
    if isinstance(error, pynvml.NVMLError_LibraryNotFound):
        return telemetry_pb2.GpuCollectionStatus(
            state=_NO_GPU,
            message="NVIDIA driver not found (NVML library not loaded): no GPU telemetry",
        )
    if isinstance(error, pynvml.NVMLError_DriverNotLoaded):
        return telemetry_pb2.GpuCollectionStatus(
            state=_NO_GPU, message="NVIDIA kernel driver not loaded: no GPU telemetry"
        )
    if isinstance(error, pynvml.NVMLError_NoPermission):
        return telemetry_pb2.GpuCollectionStatus(
            state=_ERROR,
            message="no permission to use NVML (check /dev/nvidia* access): no GPU telemetry",
        )
    if isinstance(error, pynvml.NVMLError_LibRmVersionMismatch):
        return telemetry_pb2.GpuCollectionStatus(
            state=_ERROR,
            message=(
                "NVML library and kernel driver versions differ (driver upgraded without a "
                "reboot or module reload): no GPU telemetry"
            ),
        )
    return telemetry_pb2.GpuCollectionStatus(
        state=_ERROR, message=f"NVML initialization failed ({error}): no GPU telemetry"
    )


class _DeviceReader:
    """Calls NVML for one device; a field NVML cannot read is left at zero and named."""

    def __init__(self, device: _Device) -> None:
        self._device = device
        self.unsupported: list[str] = []

    def read(
        self,
        fields: str | Sequence[str],
        function: str,
        *args: Any,
        fallback: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Returns the NVML function's result, or None after noting `fields` as unsupported.

        `fallback` is tried when the driver lacks `function` (NVML renames calls across
        releases). Raises `_GpuLost` when the device has fallen off the bus.
        """
        names = [fields] if isinstance(fields, str) else list(fields)
        call = getattr(pynvml, function, None)
        try:
            if call is None:
                raise pynvml.NVMLError_FunctionNotFound()
            return call(self._device.handle, *args, **kwargs)
        except pynvml.NVMLError_GpuIsLost as error:
            raise _GpuLost(error) from error
        except pynvml.NVMLError as error:
            if fallback is not None and isinstance(error, pynvml.NVMLError_FunctionNotFound):
                return self.read(fields, fallback, *args, **kwargs)
            if not isinstance(error, pynvml.NVMLError_NotSupported):
                _log.debug("%s: %s failed: %s", self._device.label, function, error)
            self.unsupported.extend(names)
            return None


class GpuCollector:
    """Reads NVIDIA GPUs through NVML. Blocking and not thread-safe: keep it on one thread.

    A node without a driver or GPU is a normal state (NO_GPU), not an error. Starting is retried
    at most every `retry_interval` seconds, so a driver installed later is picked up without
    paying for a failing nvmlInit on every collection.
    """

    def __init__(
        self,
        *,
        retry_interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retry_interval = retry_interval
        self._clock = clock
        self._initialized = False
        self._devices: list[_Device] = []
        self._event_set: Any = None
        self._pending_events: list[agent_pb2.AgentEvent] = []
        # Read by diagnostics from other threads while a drain may be stuck, hence the lock.
        self._recent_xids: collections.deque[agent_pb2.AgentEvent] = collections.deque(
            maxlen=RECENT_XID_EVENTS
        )
        self._recent_xids_lock = threading.Lock()
        self._driver_version = ""
        self._nvml_version = ""
        # Replaced, never mutated, so that other threads may read it while a call is stuck.
        self._status = telemetry_pb2.GpuCollectionStatus(message="GPU collection not started")
        # collect() before any start() starts right away.
        self._next_start_attempt = float("-inf")

    @property
    def status(self) -> telemetry_pb2.GpuCollectionStatus:
        """A copy of the current status; safe to read from any thread."""
        status = telemetry_pb2.GpuCollectionStatus()
        status.CopyFrom(self._status)
        return status

    def start(self) -> telemetry_pb2.GpuCollectionStatus:
        """Initializes NVML, opens every GPU and subscribes to XID events. Idempotent."""
        if self._initialized:
            return self.status
        self._next_start_attempt = self._clock() + self._retry_interval
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            self._set_status(_status_for_init_error(error))
            _log.info("GPU collection unavailable: %s", self._status.message)
            return self.status
        self._initialized = True
        self._driver_version = self._system_string("nvmlSystemGetDriverVersion")
        self._nvml_version = self._system_string("nvmlSystemGetNVMLVersion")
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as error:
            self._shutdown()
            self._set_status(
                telemetry_pb2.GpuCollectionStatus(
                    state=_ERROR, message=f"could not count NVIDIA GPUs ({error})"
                )
            )
            return self.status
        if count == 0:
            # Shut NVML down again so the periodic retry starts from scratch.
            self._shutdown()
            self._set_status(
                telemetry_pb2.GpuCollectionStatus(state=_NO_GPU, message="no NVIDIA GPU found")
            )
            _log.info("GPU collection unavailable: no NVIDIA GPU found")
            return self.status
        self._devices = [self._open_device(index) for index in range(count)]
        self._register_xid_events()
        self._refresh_status()
        _log.info(
            "GPU collection started: %d GPU(s), driver %s, NVML %s",
            count,
            self._driver_version,
            self._nvml_version,
        )
        return self.status

    def inventory(self) -> list[fleet_pb2.GpuInventory]:
        """Identity and limits of every readable GPU; empty when there is none."""
        if not self._initialized:
            return []
        inventory: list[fleet_pb2.GpuInventory] = []
        for device in self._devices:
            if device.failure is not None:
                continue
            try:
                inventory.append(self._inventory_of(device))
            except _GpuLost as lost:
                self._mark_lost(device, lost.error)
        self._refresh_status()
        return inventory

    def collect(self) -> GpuReading:
        """Reads every GPU and drains pending XID events."""
        if not self._initialized:
            if self._clock() >= self._next_start_attempt:
                self.start()
            if not self._initialized:
                return GpuReading(status=self.status)
        xid_events = self._drain_xid_events()
        gpus: list[telemetry_pb2.GpuTelemetry] = []
        for device in self._devices:
            if device.failure is not None:
                continue
            try:
                gpus.append(self._telemetry_of(device))
            except _GpuLost as lost:
                self._mark_lost(device, lost.error)
        self._refresh_status()
        events, self._pending_events = [*self._pending_events, *xid_events], []
        return GpuReading(status=self.status, gpus=gpus, events=events)

    def stop(self) -> None:
        """Releases the event set and shuts NVML down; a later collect() starts again."""
        if self._event_set is not None:
            try:
                pynvml.nvmlEventSetFree(self._event_set)
            except pynvml.NVMLError as error:
                _log.debug("nvmlEventSetFree failed: %s", error)
            self._event_set = None
        self._shutdown()
        self._devices = []
        self._next_start_attempt = float("-inf")
        self._set_status(telemetry_pb2.GpuCollectionStatus(message="GPU collection stopped"))

    def recent_xid_events(self) -> list[agent_pb2.AgentEvent]:
        """The last `RECENT_XID_EVENTS` XID events seen, oldest first; safe from any thread."""
        with self._recent_xids_lock:
            return list(self._recent_xids)

    def power_limits(self, indices: Sequence[int] | None = None) -> list[PowerLimit]:
        """Current power limit and accepted range of the given GPUs (all when None).

        Raises `GpuUnavailable`, `UnknownGpu`, or `GpuCallFailed` (lost GPU, NVML error).
        """
        limits: list[PowerLimit] = []
        for device in self._usable_devices(indices):
            milliwatts = self._device_call(device, "nvmlDeviceGetPowerManagementLimit")
            low, high = self._device_call(device, "nvmlDeviceGetPowerManagementLimitConstraints")
            limits.append(
                PowerLimit(device.index, device.uuid, int(milliwatts), int(low), int(high))
            )
        return limits

    def set_power_limit(self, index: int, milliwatts: int) -> None:
        """Sets one GPU's power management limit; raises like `power_limits`."""
        [device] = self._usable_devices([index])
        self._device_call(device, "nvmlDeviceSetPowerManagementLimit", milliwatts)
        _log.info("%s: power limit set to %d mW", device.label, milliwatts)

    def diagnostics(self) -> dict[str, Any]:
        """A JSON-ready health report of every GPU, for a person diagnosing the node."""
        if not self._initialized:
            return {
                "available": False,
                "reason": self._status.message,
                "driver_version": self._driver_version or "no driver",
                "nvml_version": self._nvml_version,
            }
        gpus: list[dict[str, Any]] = []
        for device in self._devices:
            if device.failure is None:
                try:
                    gpus.append(self._diagnostics_of(device))
                    continue
                except _GpuLost as lost:
                    self._mark_lost(device, lost.error)
            gpus.append({"index": device.index, "uuid": device.uuid, "error": device.failure})
        self._refresh_status()
        return {
            "available": True,
            "status": self._status.message,
            "driver_version": self._driver_version,
            "nvml_version": self._nvml_version,
            "gpus": gpus,
        }

    def _usable_devices(self, indices: Sequence[int] | None) -> list[_Device]:
        if not self._initialized:
            raise GpuUnavailable(self.status)
        if indices is None:
            chosen = list(self._devices)
        else:
            chosen = []
            for index in indices:
                if not 0 <= index < len(self._devices):
                    raise UnknownGpu(index, len(self._devices))
                chosen.append(self._devices[index])
        for device in chosen:
            if device.failure is not None:
                raise GpuCallFailed(device.failure)
        return chosen

    def _device_call(self, device: _Device, function: str, *args: Any) -> Any:
        try:
            return getattr(pynvml, function)(device.handle, *args)
        except pynvml.NVMLError_GpuIsLost as error:
            self._mark_lost(device, error)
            self._refresh_status()
            raise GpuCallFailed(str(device.failure), error) from error
        except pynvml.NVMLError as error:
            raise GpuCallFailed(f"{device.label}: {function} failed: {error}", error) from error

    def _diagnostics_of(self, device: _Device) -> dict[str, Any]:
        reader = _DeviceReader(device)
        report: dict[str, Any] = {"index": device.index, "uuid": device.uuid}
        name = reader.read("name", "nvmlDeviceGetName")
        if name is not None:
            report["name"] = _text(name)
        pci = reader.read("pci_bus_id", "nvmlDeviceGetPciInfo")
        if pci is not None:
            report["pci_bus_id"] = _text(pci.busId)
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

    def _shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as error:
                _log.debug("nvmlShutdown failed: %s", error)

    def _set_status(self, status: telemetry_pb2.GpuCollectionStatus) -> None:
        status.driver_version = self._driver_version
        status.nvml_version = self._nvml_version
        self._status = status

    def _refresh_status(self) -> None:
        failures = [device.failure for device in self._devices if device.failure is not None]
        readable = len(self._devices) - len(failures)
        if failures:
            message = "; ".join(failures) + f"; {readable} other GPU(s) still report"
            self._set_status(telemetry_pb2.GpuCollectionStatus(state=_ERROR, message=message))
        else:
            self._set_status(
                telemetry_pb2.GpuCollectionStatus(
                    state=_OK, message=f"{readable} NVIDIA GPU(s) read"
                )
            )

    @staticmethod
    def _system_string(function: str) -> str:
        try:
            return _text(getattr(pynvml, function)())
        except pynvml.NVMLError as error:
            _log.debug("%s failed: %s", function, error)
            return ""

    def _open_device(self, index: int) -> _Device:
        device = _Device(index=index, handle=None)
        try:
            device.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError_GpuIsLost as error:
            self._mark_lost(device, error)
            return device
        except pynvml.NVMLError as error:
            # E.g. insufficient external power: NVML refuses a handle to an unusable board.
            device.failure = f"GPU {index} cannot be opened ({error})"
            _log.warning("%s", device.failure)
            return device
        try:
            device.uuid = _text(pynvml.nvmlDeviceGetUUID(device.handle))
        except pynvml.NVMLError_GpuIsLost as error:
            self._mark_lost(device, error)
        except pynvml.NVMLError as error:
            _log.debug("GPU %d: nvmlDeviceGetUUID failed: %s", index, error)
        return device

    def _mark_lost(self, device: _Device, error: pynvml.NVMLError) -> None:
        if device.failure is not None:
            return
        device.failure = f"{device.label} is lost ({error}): it needs a reset or a reboot"
        _log.warning("%s", device.failure)
        event = _now_event(
            agent_pb2.AGENT_EVENT_KIND_GPU_LOST,
            f"{device.label} stopped answering NVML ({error}); it needs a reset or a reboot",
        )
        event.gpu_index = device.index
        event.gpu_uuid = device.uuid
        self._pending_events.append(event)

    def _register_xid_events(self) -> None:
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as error:
            _log.info("XID events unavailable: nvmlEventSetCreate failed: %s", error)
            return
        for device in self._devices:
            if device.failure is not None:
                continue
            try:
                pynvml.nvmlDeviceRegisterEvents(
                    device.handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set
                )
            except pynvml.NVMLError_GpuIsLost as error:
                self._mark_lost(device, error)
            except pynvml.NVMLError as error:
                # NotSupported on some boards and in some containers: telemetry still works.
                _log.info("%s: XID events unavailable: %s", device.label, error)

    def _drain_xid_events(self) -> list[agent_pb2.AgentEvent]:
        if self._event_set is None:
            return []
        by_address = {
            device.address: device for device in self._devices if device.address is not None
        }
        events: list[agent_pb2.AgentEvent] = []
        for _ in range(_MAX_EVENTS_PER_COLLECT):
            try:
                # Timeout 0: return what is queued, never wait.
                data = pynvml.nvmlEventSetWait_v2(self._event_set, 0)
            except pynvml.NVMLError_Timeout:
                break
            except pynvml.NVMLError as error:
                _log.debug("nvmlEventSetWait_v2 failed: %s", error)
                break
            if not int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
                continue
            xid = int(data.eventData)
            address = _handle_address(data.device)
            device = by_address.get(address) if address is not None else None
            label = device.label if device is not None else "an unknown GPU"
            event = _now_event(agent_pb2.AGENT_EVENT_KIND_GPU_XID, f"XID {xid} on {label}")
            event.xid = xid
            if device is not None:
                device.last_xid = xid
                event.gpu_index = device.index
                event.gpu_uuid = device.uuid
            _log.warning("XID %d on %s", xid, label)
            events.append(event)
        if events:
            with self._recent_xids_lock:
                self._recent_xids.extend(events)
        return events

    def _telemetry_of(self, device: _Device) -> telemetry_pb2.GpuTelemetry:
        reader = _DeviceReader(device)
        gpu = telemetry_pb2.GpuTelemetry(index=device.index, uuid=device.uuid)
        utilization = reader.read(_UTILIZATION_FIELDS, "nvmlDeviceGetUtilizationRates")
        if utilization is not None:
            gpu.utilization_gpu_percent = int(utilization.gpu)
            gpu.utilization_memory_percent = int(utilization.memory)
        # v2: the v1 call counts memory reserved by the driver as "used".
        memory = reader.read(
            _MEMORY_FIELDS, "nvmlDeviceGetMemoryInfo", version=pynvml.nvmlMemory_v2
        )
        if memory is not None:
            gpu.memory_total_bytes = int(memory.total)
            gpu.memory_used_bytes = int(memory.used)
            gpu.memory_free_bytes = int(memory.free)
            gpu.memory_reserved_bytes = int(memory.reserved)
        for field, function, args in _SCALAR_FIELDS:
            value = reader.read(field, function, *args)
            if value is not None:
                setattr(gpu, field, int(value))
        reasons = reader.read(
            "throttle_reasons",
            "nvmlDeviceGetCurrentClocksEventReasons",
            fallback="nvmlDeviceGetCurrentClocksThrottleReasons",
        )
        if reasons is not None:
            gpu.throttle_reasons = int(reasons)
        rows = reader.read(_REMAPPED_ROWS_FIELDS, "nvmlDeviceGetRemappedRows")
        if rows is not None:
            correctable, uncorrectable, pending, failure = rows
            gpu.remapped_rows_correctable = int(correctable)
            gpu.remapped_rows_uncorrectable = int(uncorrectable)
            gpu.remapped_rows_pending = bool(pending)
            if failure and not device.remap_failure_reported:
                self._report_remap_failure(device)
        gpu.last_xid = device.last_xid
        gpu.unsupported.extend(reader.unsupported)
        return gpu

    def _report_remap_failure(self, device: _Device) -> None:
        # GpuTelemetry has no field for it, yet it means the board needs service: say it once.
        device.remap_failure_reported = True
        message = f"row remapping failed on {device.label}: its memory errors cannot be remapped"
        _log.warning("%s", message)
        event = _now_event(agent_pb2.AGENT_EVENT_KIND_GPU_ECC, message)
        event.gpu_index = device.index
        event.gpu_uuid = device.uuid
        self._pending_events.append(event)

    def _inventory_of(self, device: _Device) -> fleet_pb2.GpuInventory:
        reader = _DeviceReader(device)
        inventory = fleet_pb2.GpuInventory(
            index=device.index, uuid=device.uuid, driver_version=self._driver_version
        )
        for field, function in (
            ("name", "nvmlDeviceGetName"),
            ("serial", "nvmlDeviceGetSerial"),
            ("vbios_version", "nvmlDeviceGetVbiosVersion"),
        ):
            value = reader.read(field, function)
            if value is not None:
                setattr(inventory, field, _text(value))
        pci = reader.read("pci_bus_id", "nvmlDeviceGetPciInfo")
        if pci is not None:
            inventory.pci_bus_id = _text(pci.busId)
        memory = reader.read(
            "memory_total_bytes", "nvmlDeviceGetMemoryInfo", version=pynvml.nvmlMemory_v2
        )
        if memory is not None:
            inventory.memory_total_bytes = int(memory.total)
        limits = reader.read(
            ("power_limit_min_milliwatts", "power_limit_max_milliwatts"),
            "nvmlDeviceGetPowerManagementLimitConstraints",
        )
        if limits is not None:
            inventory.power_limit_min_milliwatts = int(limits[0])
            inventory.power_limit_max_milliwatts = int(limits[1])
        default_limit = reader.read(
            "power_limit_default_milliwatts", "nvmlDeviceGetPowerManagementDefaultLimit"
        )
        if default_limit is not None:
            inventory.power_limit_default_milliwatts = int(default_limit)
        mig = reader.read("mig_mode", "nvmlDeviceGetMigMode")
        if mig is not None:
            current_mode = mig[0]
            inventory.mig_mode = (
                "Enabled" if current_mode == pynvml.NVML_DEVICE_MIG_ENABLE else "Disabled"
            )
        return inventory


class AsyncGpuCollector:
    """Runs a `GpuCollector` on a dedicated thread with a deadline on every NVML call.

    A call that overruns yields a TIMEOUT reading (never an exception), and so does every call
    while it stays stuck; events a late collection drained are delivered with the next reading.
    """

    def __init__(
        self,
        collector: GpuCollector | None = None,
        *,
        call_timeout: float = 10.0,
        runner: DeadlineRunner | None = None,
    ) -> None:
        self._collector = collector if collector is not None else GpuCollector()
        self._runner = runner if runner is not None else DeadlineRunner("NVML")
        self._call_timeout = call_timeout
        self._late_collect: concurrent.futures.Future[Any] | None = None

    @property
    def collector(self) -> GpuCollector:
        return self._collector

    @property
    def runner(self) -> DeadlineRunner:
        return self._runner

    async def start(self) -> telemetry_pb2.GpuCollectionStatus:
        try:
            return await self._runner.call(self._collector.start, timeout=self._call_timeout)
        except CollectorTimeout as timeout:
            _log.warning("GPU collection start timed out: %s", timeout)
            return self._timeout_status(timeout)

    async def inventory(self) -> list[fleet_pb2.GpuInventory]:
        """GPU inventory; empty (and logged) when NVML does not answer in time."""
        try:
            return await self._runner.call(self._collector.inventory, timeout=self._call_timeout)
        except CollectorTimeout as timeout:
            _log.warning("GPU inventory skipped: %s", timeout)
            return []

    async def collect(self) -> GpuReading:
        try:
            reading = await self._runner.call(self._collector.collect, timeout=self._call_timeout)
        except CollectorTimeout as timeout:
            if timeout.late_result is not None:
                self._late_collect = timeout.late_result
            _log.warning("GPU collection timed out: %s", timeout)
            return GpuReading(status=self._timeout_status(timeout))
        except Exception as error:
            # A bug or an unexpected binding error must cost the GPU part of one sample, not
            # the whole sample.
            _log.exception("GPU collection failed")
            status = self._collector.status
            status.state = _ERROR
            status.message = f"GPU collection failed: {error!r}"
            return GpuReading(status=status)
        return self._with_late_events(reading)

    @property
    def status(self) -> telemetry_pb2.GpuCollectionStatus:
        """The collector's last known status; never waits for NVML."""
        return self._collector.status

    def recent_xid_events(self) -> list[agent_pb2.AgentEvent]:
        """Recent XID events, oldest first; never waits for NVML, so it answers while stuck."""
        return self._collector.recent_xid_events()

    async def call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """Runs `fn(*args)` on the NVML thread under the per-call deadline.

        For anything that touches NVML outside this class; raises `CollectorTimeout` when the
        call overruns or an earlier one is still stuck, and whatever `fn` raises.
        """
        return await self._runner.call(fn, *args, timeout=self._call_timeout)

    async def power_limits(self, indices: Sequence[int] | None = None) -> list[PowerLimit]:
        """See `GpuCollector.power_limits`; also raises `CollectorTimeout`."""
        return await self.call(self._collector.power_limits, indices)

    async def set_power_limit(self, index: int, milliwatts: int) -> None:
        """See `GpuCollector.set_power_limit`; also raises `CollectorTimeout`."""
        await self.call(self._collector.set_power_limit, index, milliwatts)

    async def diagnostics(self) -> dict[str, Any]:
        """See `GpuCollector.diagnostics`; also raises `CollectorTimeout`."""
        return await self.call(self._collector.diagnostics)

    async def stop(self) -> None:
        """Shuts NVML down (unless a call is stuck) and ends the worker thread."""
        try:
            await self._runner.call(self._collector.stop, timeout=self._call_timeout)
        except CollectorTimeout as timeout:
            _log.warning("NVML shutdown skipped: %s", timeout)
        finally:
            self._runner.close()

    def _timeout_status(self, timeout: CollectorTimeout) -> telemetry_pb2.GpuCollectionStatus:
        status = self._collector.status
        status.state = _TIMEOUT
        status.message = f"{timeout}; GPU collection skipped until it returns"
        return status

    def _with_late_events(self, reading: GpuReading) -> GpuReading:
        late = self._late_collect
        if late is None or not late.done():
            return reading
        self._late_collect = None
        if late.cancelled() or late.exception() is not None:
            return reading
        late_reading = late.result()
        if not isinstance(late_reading, GpuReading) or not late_reading.events:
            return reading
        return dataclasses.replace(reading, events=[*late_reading.events, *reading.events])
