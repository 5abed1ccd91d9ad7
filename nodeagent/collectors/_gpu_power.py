"""GPU power management limits: reading a GPU's limit with the range NVML accepts, and setting
it. The collector chooses the GPUs and turns NVML errors into `GpuCallFailed`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol

from nodeagent.collectors._nvml import Device

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PowerLimit:
    """One GPU's power management limit and the range NVML accepts for it, in milliwatts."""

    index: int
    uuid: str
    milliwatts: int
    min_milliwatts: int
    max_milliwatts: int


class DeviceCall(Protocol):
    """Calls an NVML function on one device; raises `GpuCallFailed` when NVML refuses."""

    def __call__(self, device: Device, function: str, *args: Any) -> Any: ...


def read_power_limit(device: Device, call: DeviceCall) -> PowerLimit:
    """The GPU's current power limit and accepted range."""
    milliwatts = call(device, "nvmlDeviceGetPowerManagementLimit")
    low, high = call(device, "nvmlDeviceGetPowerManagementLimitConstraints")
    return PowerLimit(device.index, device.uuid, int(milliwatts), int(low), int(high))


def write_power_limit(device: Device, milliwatts: int, call: DeviceCall) -> None:
    """Sets the GPU's power management limit."""
    call(device, "nvmlDeviceSetPowerManagementLimit", milliwatts)
    _log.info("%s: power limit set to %d mW", device.label, milliwatts)
