"""Node telemetry collectors: host (psutil) and GPU (NVML, which also reads diagnostics and sets
power limits), the plain values they produce, and the deadline runner that keeps a hung driver
call from stalling the agent. Nothing here knows the wire format; the agent encodes the values.
"""

from nodeagent.collectors._deadline import CollectorTimeout, DeadlineRunner
from nodeagent.collectors._gpu import GpuCollector
from nodeagent.collectors._gpu_async import AsyncGpuCollector
from nodeagent.collectors._gpu_power import PowerLimit
from nodeagent.collectors._host import HostCollector
from nodeagent.collectors._nvml import GpuCallFailed, GpuUnavailable, UnknownGpu
from nodeagent.collectors._values import (
    CpuTimes,
    DiskIo,
    FilesystemUsage,
    GpuCollectionState,
    GpuEvent,
    GpuEventKind,
    GpuInventoryItem,
    GpuMetrics,
    GpuReading,
    GpuStatus,
    HostInventory,
    HostSnapshot,
    LoadAverage,
    MemoryUsage,
    NetworkIo,
    Pressure,
)
from nodeagent.collectors._xid import RECENT_XID_EVENTS

__all__ = [
    "RECENT_XID_EVENTS",
    "AsyncGpuCollector",
    "CollectorTimeout",
    "CpuTimes",
    "DeadlineRunner",
    "DiskIo",
    "FilesystemUsage",
    "GpuCallFailed",
    "GpuCollectionState",
    "GpuCollector",
    "GpuEvent",
    "GpuEventKind",
    "GpuInventoryItem",
    "GpuMetrics",
    "GpuReading",
    "GpuStatus",
    "GpuUnavailable",
    "HostCollector",
    "HostInventory",
    "HostSnapshot",
    "LoadAverage",
    "MemoryUsage",
    "NetworkIo",
    "PowerLimit",
    "Pressure",
    "UnknownGpu",
]
