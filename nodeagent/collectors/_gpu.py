"""The GPU collector: starts and stops NVML (the `pynvml` module of nvidia-ml-py), keeps the
table of opened GPUs and the collection status, and answers every GPU question (readings,
inventory, XID events, diagnostics, power limits) through the module that knows each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from nodeagent.collectors._gpu_diagnostics import read_diagnostics
from nodeagent.collectors._gpu_power import PowerLimit, read_power_limit, write_power_limit
from nodeagent.collectors._gpu_readings import read_inventory, read_metrics
from nodeagent.collectors._nvml import (
    Device,
    GpuCallFailed,
    GpuLost,
    GpuUnavailable,
    UnknownGpu,
    event_now,
    system_string,
    text,
)
from nodeagent.collectors._pynvml import driver_library_present, pynvml
from nodeagent.collectors._values import (
    GpuCollectionState,
    GpuEvent,
    GpuEventKind,
    GpuInventoryItem,
    GpuMetrics,
    GpuReading,
    GpuStatus,
)
from nodeagent.collectors._xid import XidWatch

_log = logging.getLogger(__name__)

_OK = GpuCollectionState.OK
_NO_GPU = GpuCollectionState.NO_GPU
_ERROR = GpuCollectionState.ERROR

_NO_DRIVER = "NVIDIA driver not found (NVML library not loaded): no GPU telemetry"


def _init_failure(error: pynvml.NVMLError) -> tuple[GpuCollectionState, str]:
    """The state and message for an nvmlInit that failed."""
    if isinstance(error, pynvml.NVMLError_LibraryNotFound):
        return _NO_GPU, _NO_DRIVER
    if isinstance(error, pynvml.NVMLError_DriverNotLoaded):
        return _NO_GPU, "NVIDIA kernel driver not loaded: no GPU telemetry"
    if isinstance(error, pynvml.NVMLError_NoPermission):
        return (
            _ERROR,
            "no permission to use NVML (check /dev/nvidia* access): no GPU telemetry",
        )
    if isinstance(error, pynvml.NVMLError_LibRmVersionMismatch):
        return (
            _ERROR,
            "NVML library and kernel driver versions differ (driver upgraded without a "
            "reboot or module reload): no GPU telemetry",
        )
    return _ERROR, f"NVML initialization failed ({error}): no GPU telemetry"


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
        self._devices: list[Device] = []
        self._xids = XidWatch()
        self._pending_events: list[GpuEvent] = []
        self._driver_version = ""
        self._nvml_version = ""
        # Immutable and replaced whole, so other threads may read it while a call is stuck.
        self._status = GpuStatus(GpuCollectionState.UNSPECIFIED, "GPU collection not started")
        # collect() before any start() starts right away.
        self._next_start_attempt = float("-inf")

    @property
    def status(self) -> GpuStatus:
        """The current status; safe to read from any thread."""
        return self._status

    def start(self) -> GpuStatus:
        """Initializes NVML, opens every GPU and subscribes to XID events. Idempotent."""
        if self._initialized:
            return self._status
        self._next_start_attempt = self._clock() + self._retry_interval
        if not driver_library_present():
            # What nvmlInit would say, without importing pynvml for it.
            self._set_status(_NO_GPU, _NO_DRIVER)
            _log.info("GPU collection unavailable: %s", self._status.message)
            return self._status
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            self._set_status(*_init_failure(error))
            _log.info("GPU collection unavailable: %s", self._status.message)
            return self._status
        self._initialized = True
        self._driver_version = system_string("nvmlSystemGetDriverVersion")
        self._nvml_version = system_string("nvmlSystemGetNVMLVersion")
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as error:
            self._shutdown()
            self._set_status(_ERROR, f"could not count NVIDIA GPUs ({error})")
            return self._status
        if count == 0:
            # Shut NVML down again so the periodic retry starts from scratch.
            self._shutdown()
            self._set_status(_NO_GPU, "no NVIDIA GPU found")
            _log.info("GPU collection unavailable: no NVIDIA GPU found")
            return self._status
        self._devices = [self._open_device(index) for index in range(count)]
        self._xids.subscribe(self._devices, self._mark_lost)
        self._refresh_status()
        _log.info(
            "GPU collection started: %d GPU(s), driver %s, NVML %s",
            count,
            self._driver_version,
            self._nvml_version,
        )
        return self._status

    def inventory(self) -> list[GpuInventoryItem]:
        """Identity and limits of every readable GPU; empty when there is none."""
        if not self._initialized:
            return []
        inventory: list[GpuInventoryItem] = []
        for device in self._devices:
            if device.failure is not None:
                continue
            try:
                inventory.append(read_inventory(device, self._driver_version))
            except GpuLost as lost:
                self._mark_lost(device, lost.error)
        self._refresh_status()
        return inventory

    def collect(self) -> GpuReading:
        """Reads every GPU and drains pending XID events."""
        if not self._initialized:
            if self._clock() >= self._next_start_attempt:
                self.start()
            if not self._initialized:
                return GpuReading(status=self._status)
        xid_events = self._xids.drain(self._devices)
        gpus: list[GpuMetrics] = []
        for device in self._devices:
            if device.failure is not None:
                continue
            try:
                gpus.append(read_metrics(device, self._pending_events))
            except GpuLost as lost:
                self._mark_lost(device, lost.error)
        self._refresh_status()
        events = (*self._pending_events, *xid_events)
        self._pending_events = []
        return GpuReading(status=self._status, gpus=tuple(gpus), events=events)

    def reading_without_nvml(self) -> GpuReading | None:
        """What `collect()` would return now without calling NVML: NVML is not running and no
        start attempt is due (a node without GPUs, between retries). None when `collect()` has
        work to do. Reads state only, so any thread may ask while no call runs on the
        collector's own."""
        if self._initialized or self._pending_events:
            return None
        if self._clock() >= self._next_start_attempt:
            return None
        return GpuReading(status=self._status)

    def stop(self) -> None:
        """Releases the event set and shuts NVML down; a later collect() starts again."""
        self._xids.close()
        self._shutdown()
        self._devices = []
        self._next_start_attempt = float("-inf")
        self._set_status(GpuCollectionState.UNSPECIFIED, "GPU collection stopped")

    def recent_xid_events(self) -> list[GpuEvent]:
        """The last `RECENT_XID_EVENTS` XID events seen, oldest first; safe from any thread."""
        return self._xids.recent()

    def power_limits(self, indices: Sequence[int] | None = None) -> list[PowerLimit]:
        """Current power limit and accepted range of the given GPUs (all when None).

        Raises `GpuUnavailable`, `UnknownGpu`, or `GpuCallFailed` (lost GPU, NVML error).
        """
        return [
            read_power_limit(device, self._device_call) for device in self._usable_devices(indices)
        ]

    def set_power_limit(self, index: int, milliwatts: int) -> None:
        """Sets one GPU's power management limit; raises like `power_limits`."""
        [device] = self._usable_devices([index])
        write_power_limit(device, milliwatts, self._device_call)

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
                    gpus.append(read_diagnostics(device))
                    continue
                except GpuLost as lost:
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

    def _usable_devices(self, indices: Sequence[int] | None) -> list[Device]:
        if not self._initialized:
            raise GpuUnavailable(self._status)
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

    def _device_call(self, device: Device, function: str, *args: Any) -> Any:
        try:
            return getattr(pynvml, function)(device.handle, *args)
        except pynvml.NVMLError_GpuIsLost as error:
            self._mark_lost(device, error)
            self._refresh_status()
            raise GpuCallFailed(str(device.failure), error) from error
        except pynvml.NVMLError as error:
            raise GpuCallFailed(f"{device.label}: {function} failed: {error}", error) from error

    def _shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as error:
                _log.debug("nvmlShutdown failed: %s", error)

    def _set_status(self, state: GpuCollectionState, message: str) -> None:
        self._status = GpuStatus(state, message, self._driver_version, self._nvml_version)

    def _refresh_status(self) -> None:
        failures = [device.failure for device in self._devices if device.failure is not None]
        readable = len(self._devices) - len(failures)
        if failures:
            self._set_status(
                _ERROR, "; ".join(failures) + f"; {readable} other GPU(s) still report"
            )
        else:
            self._set_status(_OK, f"{readable} NVIDIA GPU(s) read")

    def _open_device(self, index: int) -> Device:
        device = Device(index=index, handle=None)
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
            device.uuid = text(pynvml.nvmlDeviceGetUUID(device.handle))
        except pynvml.NVMLError_GpuIsLost as error:
            self._mark_lost(device, error)
        except pynvml.NVMLError as error:
            _log.debug("GPU %d: nvmlDeviceGetUUID failed: %s", index, error)
        return device

    def _mark_lost(self, device: Device, error: pynvml.NVMLError) -> None:
        if device.failure is not None:
            return
        device.failure = f"{device.label} is lost ({error}): it needs a reset or a reboot"
        _log.warning("%s", device.failure)
        self._pending_events.append(
            event_now(
                GpuEventKind.LOST,
                f"{device.label} stopped answering NVML ({error}); it needs a reset or a reboot",
                device,
            )
        )
