"""Telemetry collection: one sample per interval from the host and GPU collectors into the
spool, the GPU events and inventory the session reports, and the interval itself, which the
control plane suggests and a command may pin.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import platform
import time
from collections.abc import Callable

from sentinel.v1 import telemetry_pb2

from nodeagent import encode
from nodeagent._state import AgentStateStore
from nodeagent.collectors import (
    AsyncGpuCollector,
    GpuCollectionState,
    GpuEvent,
    GpuInventoryItem,
    GpuReading,
    GpuStatus,
    HostCollector,
    HostInventory,
)

log = logging.getLogger(__name__)

_INTERVAL_SETTING = "telemetry_interval_ms"

_GPU_DISABLED = GpuReading(
    status=GpuStatus(GpuCollectionState.NO_GPU, "GPU collection disabled"),
)


def _wake(sleep: asyncio.Future[None]) -> None:
    if not sleep.done():
        sleep.set_result(None)


class TelemetryInterval:
    """The telemetry period: the agent's setting, replaced by the control plane's, unless a
    command pinned one (a pinned interval survives agent restarts)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pinned = False
        # The collection loop's sleep, ended early when `seconds` changes, so the loop does not
        # sleep out the old interval.
        self._sleep: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> None:
        """Waits `seconds`, or less when the interval changes meanwhile. A timer and a future:
        no task, and no cancellation to unwind, per cycle."""
        loop = asyncio.get_running_loop()
        sleep = self._sleep = loop.create_future()
        timer = loop.call_later(seconds, _wake, sleep)
        try:
            await sleep
        finally:
            timer.cancel()
            self._sleep = None

    def _changed(self) -> None:
        if self._sleep is not None:
            _wake(self._sleep)

    async def restore(self, state: AgentStateStore) -> None:
        """Takes up the interval a command pinned before the agent restarted, if any."""
        pinned_ms = await asyncio.to_thread(state.get_setting, _INTERVAL_SETTING)
        if pinned_ms:
            self.seconds, self.pinned = pinned_ms / 1000, True

    def suggest(self, seconds: float) -> None:
        """The control plane's interval at session start; a pinned interval stays."""
        if not self.pinned and seconds > 0:
            self.seconds = seconds
            self._changed()

    def update(self, seconds: float) -> None:
        """The control plane's configuration update; applies until the next one or a restart."""
        if seconds > 0:
            self.seconds = seconds
            self._changed()

    async def pin(self, seconds: float, state: AgentStateStore) -> None:
        """A command's interval, stored so that it survives restarts."""
        await asyncio.to_thread(state.put_setting, _INTERVAL_SETTING, int(seconds * 1000))
        self.seconds, self.pinned = seconds, True
        self._changed()
        log.info("telemetry interval set to %g s", seconds)


class TelemetrySampler:
    """Collects one telemetry sample per interval into the spool, and keeps what the session
    reports besides: GPU events and the host and GPU inventory."""

    def __init__(
        self,
        node_id: str,
        *,
        host: HostCollector | None,
        gpu: AsyncGpuCollector | None,
        interval: TelemetryInterval,
    ) -> None:
        self._node_id = node_id
        self._host = host
        self._gpu = gpu
        self.interval = interval
        self.events: collections.deque[GpuEvent] = collections.deque(maxlen=1000)
        """GPU events not yet sent; the oldest are dropped beyond the bound."""
        self.new_sample = asyncio.Event()
        """Set after each sample is spooled."""
        self.latest_spooled: tuple[int, bytes] | None = None
        """(seq, serialized sample) of the newest sample stored in the spool by this process,
        so the session can send it without reading it back."""
        self.host_inventory = HostInventory(hostname="", os="")
        self.gpu_inventory: list[GpuInventoryItem] = []
        self.gpu_available = False
        self.last_sample: telemetry_pb2.TelemetrySample | None = None
        self.on_sample: Callable[[telemetry_pb2.TelemetrySample], None] | None = None
        """Called with each new sample (the agent's /metrics keeps the latest)."""

    async def start(self) -> None:
        """Reads the inventory and starts GPU collection (NO_GPU is a normal outcome)."""
        if self._host is not None:
            self.host_inventory = await asyncio.to_thread(self._host.inventory)
        else:
            self.host_inventory = HostInventory(
                hostname=platform.node(), os=platform.system(), architecture=platform.machine()
            )
        if self._gpu is not None:
            status = await self._gpu.start()
            self.gpu_available = status.state is GpuCollectionState.OK
            if self.gpu_available:
                self.gpu_inventory = await self._gpu.inventory()
            log.info("GPU collection: %s", status.message or encode.gpu_state_name(status.state))

    async def run(self, state: AgentStateStore) -> None:
        """Collects a sample every interval, for the agent's life."""
        interval = self.interval
        while True:
            started = time.monotonic()
            try:
                await self.collect_once(state)
            except Exception:
                log.exception("telemetry collection failed; next attempt in one interval")
            remaining = interval.seconds - (time.monotonic() - started)
            if remaining > 0:
                await interval.sleep(remaining)

    async def collect_once(self, state: AgentStateStore) -> None:
        """Reads the collectors and spools one sample under the next sequence number."""
        reading = await self._gpu.collect() if self._gpu is not None else _GPU_DISABLED
        # Host collection, encoding and the spool write: one trip to a worker thread.
        sample = await asyncio.to_thread(self._collect_and_spool, state, reading)
        if self._gpu is not None:
            self.events.extend(reading.events)
            ok = reading.status.state is GpuCollectionState.OK
            if ok and not self.gpu_available:
                # A driver that appeared after start: the next hello carries the inventory.
                self.gpu_inventory = await self._gpu.inventory()
                self.gpu_available = True
        self.last_sample = sample
        if self.on_sample is not None:
            self.on_sample(sample)
        self.new_sample.set()

    def _collect_and_spool(
        self, state: AgentStateStore, reading: GpuReading
    ) -> telemetry_pb2.TelemetrySample:
        """Blocking: reads the host, builds the sample and spools it."""
        host = self._host.collect() if self._host is not None else None
        collect_time_ns = time.time_ns()
        built: list[telemetry_pb2.TelemetrySample] = []
        payloads: list[bytes] = []

        def serialize(seq: int) -> bytes:
            sample = encode.telemetry_sample(seq, self._node_id, collect_time_ns, host, reading)
            built.append(sample)
            payloads.append(sample.SerializeToString())
            return payloads[0]

        seq, stored = state.spool_sample(serialize)
        if stored:
            # A plain assignment of a new tuple: the event loop reads it whole or not at all.
            self.latest_spooled = (seq, payloads[0])
        return built[0]
