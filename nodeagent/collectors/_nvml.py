"""The low level of GPU collection: one opened GPU, field-by-field NVML calls that name what a
board cannot read, and the errors GPU operations raise.

Everything here blocks in the driver and must stay on the collector's one thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from nodeagent.collectors._pynvml import pynvml
from nodeagent.collectors._values import GpuCollectionState, GpuEvent, GpuEventKind, GpuStatus

_log = logging.getLogger(__name__)


class GpuUnavailable(Exception):
    """NVML is not running: no driver, no GPU, or NVML refused to start (see `status`)."""

    def __init__(self, status: GpuStatus) -> None:
        super().__init__(status.message)
        self.status = status

    @property
    def no_gpu(self) -> bool:
        """True when the node has no driver or no board, as opposed to a broken NVML."""
        return self.status.state is GpuCollectionState.NO_GPU


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


class GpuLost(Exception):
    """A GPU fell off the bus during a read; the collector marks it lost and reports it once."""

    def __init__(self, error: pynvml.NVMLError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass
class Device:
    """One GPU the collector opened, and what the collector remembers about it."""

    index: int
    handle: Any
    uuid: str = ""
    failure: str | None = None
    """Set once the device cannot be read any more (lost, or its handle could not be opened)."""
    last_xid: int = 0
    remap_failure_reported: bool = False

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.uuid})" if self.uuid else f"GPU {self.index}"

    @property
    def address(self) -> int | None:
        return handle_address(self.handle)


def handle_address(handle: Any) -> int | None:
    """The pointer value of an NVML device handle; event data carries a copy of the pointer."""
    try:
        address: int | None = ctypes.cast(handle, ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return None
    return address


def text(value: object) -> str:
    """NVML's answer as text."""
    # pynvml returns str on Python 3, but some structs and older releases hand out bytes.
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def system_string(function: str) -> str:
    """A system-wide NVML string (driver or NVML version); empty when NVML does not say."""
    try:
        return text(getattr(pynvml, function)())
    except pynvml.NVMLError as error:
        _log.debug("%s failed: %s", function, error)
        return ""


class DeviceReader:
    """Calls NVML for one device; a field NVML cannot read is left at zero and named."""

    def __init__(self, device: Device) -> None:
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
        releases). Raises `GpuLost` when the device has fallen off the bus.
        """
        names = [fields] if isinstance(fields, str) else list(fields)
        call = getattr(pynvml, function, None)
        try:
            if call is None:
                raise pynvml.NVMLError_FunctionNotFound()
            return call(self._device.handle, *args, **kwargs)
        except pynvml.NVMLError_GpuIsLost as error:
            raise GpuLost(error) from error
        except pynvml.NVMLError as error:
            if fallback is not None and isinstance(error, pynvml.NVMLError_FunctionNotFound):
                return self.read(fields, fallback, *args, **kwargs)
            if not isinstance(error, pynvml.NVMLError_NotSupported):
                _log.debug("%s: %s failed: %s", self._device.label, function, error)
            self.unsupported.extend(names)
            return None


def event_now(
    kind: GpuEventKind, message: str, device: Device | None = None, *, xid: int = 0
) -> GpuEvent:
    """An event seen now, on `device` when the GPU is known."""
    if device is None:
        return GpuEvent(kind=kind, message=message, time_ns=time.time_ns(), xid=xid)
    return GpuEvent(
        kind=kind,
        message=message,
        time_ns=time.time_ns(),
        gpu_index=device.index,
        gpu_uuid=device.uuid,
        xid=xid,
    )
