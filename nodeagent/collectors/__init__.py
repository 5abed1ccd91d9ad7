"""Node telemetry collectors: host (psutil) and GPU (NVML, which also reads diagnostics and sets
power limits), plus the deadline runner that keeps a hung driver call from stalling the agent."""

from nodeagent.collectors._deadline import CollectorTimeout, DeadlineRunner
from nodeagent.collectors._gpu import (
    RECENT_XID_EVENTS,
    AsyncGpuCollector,
    GpuCallFailed,
    GpuCollector,
    GpuReading,
    GpuUnavailable,
    PowerLimit,
    UnknownGpu,
)
from nodeagent.collectors._host import HostCollector

__all__ = [
    "RECENT_XID_EVENTS",
    "AsyncGpuCollector",
    "CollectorTimeout",
    "DeadlineRunner",
    "GpuCallFailed",
    "GpuCollector",
    "GpuReading",
    "GpuUnavailable",
    "HostCollector",
    "PowerLimit",
    "UnknownGpu",
]
