"""Node telemetry collectors: host (psutil) and GPU (NVML), plus the deadline runner that keeps
a hung driver call from stalling the agent."""

from nodeagent.collectors._deadline import CollectorTimeout, DeadlineRunner
from nodeagent.collectors._gpu import AsyncGpuCollector, GpuCollector, GpuReading
from nodeagent.collectors._host import HostCollector

__all__ = [
    "AsyncGpuCollector",
    "CollectorTimeout",
    "DeadlineRunner",
    "GpuCollector",
    "GpuReading",
    "HostCollector",
]
