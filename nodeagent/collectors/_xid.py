"""XID events: subscribing the GPUs to the driver's critical-error events, draining what is
queued without ever waiting, and the ring of recent events a diagnostic report shows.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from nodeagent.collectors._nvml import Device, event_now, handle_address
from nodeagent.collectors._pynvml import pynvml
from nodeagent.collectors._values import GpuEvent, GpuEventKind

_log = logging.getLogger(__name__)

# An XID storm must not keep one collect() draining forever; the rest waits for the next call.
_MAX_EVENTS_PER_COLLECT = 256

# How many recent XID events a diagnostic report can show; older ones were already sent as
# events, so the ring only has to answer "what happened lately".
RECENT_XID_EVENTS = 64


class XidWatch:
    """Subscribes GPUs to XID events, drains them, and remembers the recent ones.

    `subscribe`, `drain` and `close` call NVML (collector thread only); `recent` may be called
    from any thread, also while a drain is stuck in the driver.
    """

    def __init__(self) -> None:
        self._event_set: Any = None
        self._recent: collections.deque[GpuEvent] = collections.deque(maxlen=RECENT_XID_EVENTS)
        self._recent_lock = threading.Lock()

    def subscribe(
        self,
        devices: Sequence[Device],
        on_lost: Callable[[Device, pynvml.NVMLError], None],
    ) -> None:
        """Registers every readable device; a device that turns out lost goes to `on_lost`."""
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as error:
            _log.info("XID events unavailable: nvmlEventSetCreate failed: %s", error)
            return
        for device in devices:
            if device.failure is not None:
                continue
            try:
                pynvml.nvmlDeviceRegisterEvents(
                    device.handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set
                )
            except pynvml.NVMLError_GpuIsLost as error:
                on_lost(device, error)
            except pynvml.NVMLError as error:
                # NotSupported on some boards and in some containers: telemetry still works.
                _log.info("%s: XID events unavailable: %s", device.label, error)

    def drain(self, devices: Sequence[Device]) -> list[GpuEvent]:
        """The XID events queued since the last drain (up to a bound); sets each GPU's last XID."""
        if self._event_set is None:
            return []
        by_address = {device.address: device for device in devices if device.address is not None}
        events: list[GpuEvent] = []
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
            address = handle_address(data.device)
            device = by_address.get(address) if address is not None else None
            label = device.label if device is not None else "an unknown GPU"
            if device is not None:
                device.last_xid = xid
            events.append(event_now(GpuEventKind.XID, f"XID {xid} on {label}", device, xid=xid))
            _log.warning("XID %d on %s", xid, label)
        if events:
            with self._recent_lock:
                self._recent.extend(events)
        return events

    def close(self) -> None:
        """Releases the event set; a later `subscribe` creates a new one."""
        if self._event_set is not None:
            try:
                pynvml.nvmlEventSetFree(self._event_set)
            except pynvml.NVMLError as error:
                _log.debug("nvmlEventSetFree failed: %s", error)
            self._event_set = None

    def recent(self) -> list[GpuEvent]:
        """The last `RECENT_XID_EVENTS` XID events seen, oldest first."""
        with self._recent_lock:
            return list(self._recent)
