"""Drives the blocking `GpuCollector` from the event loop: every NVML call runs on one worker
thread under a deadline, so a hung driver call yields a TIMEOUT reading instead of a stalled
agent.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, TypeVarTuple

from nodeagent.collectors._deadline import CollectorTimeout, DeadlineRunner
from nodeagent.collectors._gpu import GpuCollector
from nodeagent.collectors._gpu_power import PowerLimit
from nodeagent.collectors._values import (
    GpuCollectionState,
    GpuEvent,
    GpuInventoryItem,
    GpuReading,
    GpuStatus,
)

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


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

    async def start(self) -> GpuStatus:
        """See `GpuCollector.start`; a TIMEOUT status when NVML does not answer in time."""
        try:
            return await self._runner.call(self._collector.start, timeout=self._call_timeout)
        except CollectorTimeout as timeout:
            _log.warning("GPU collection start timed out: %s", timeout)
            return self._timeout_status(timeout)

    async def inventory(self) -> list[GpuInventoryItem]:
        """GPU inventory; empty (and logged) when NVML does not answer in time."""
        try:
            return await self._runner.call(self._collector.inventory, timeout=self._call_timeout)
        except CollectorTimeout as timeout:
            _log.warning("GPU inventory skipped: %s", timeout)
            return []

    async def collect(self) -> GpuReading:
        """See `GpuCollector.collect`; a TIMEOUT or ERROR reading instead of any exception."""
        if self._runner.in_flight_seconds is None:
            # Without a GPU (NVML not running, no retry due) there is nothing for the NVML
            # thread to do: answer here, without the trip to it and back.
            idle = self._collector.reading_without_nvml()
            if idle is not None:
                return self._with_late_events(idle)
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
            status = dataclasses.replace(
                self._collector.status,
                state=GpuCollectionState.ERROR,
                message=f"GPU collection failed: {error!r}",
            )
            return GpuReading(status=status)
        return self._with_late_events(reading)

    @property
    def status(self) -> GpuStatus:
        """The collector's last known status; never waits for NVML."""
        return self._collector.status

    def recent_xid_events(self) -> list[GpuEvent]:
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

    def _timeout_status(self, timeout: CollectorTimeout) -> GpuStatus:
        return dataclasses.replace(
            self._collector.status,
            state=GpuCollectionState.TIMEOUT,
            message=f"{timeout}; GPU collection skipped until it returns",
        )

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
        return dataclasses.replace(reading, events=(*late_reading.events, *reading.events))
