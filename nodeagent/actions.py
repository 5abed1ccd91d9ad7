"""The commands an agent carries out. Each action validates its parameters and returns its
output; `ActionError` with an outcome reports a refusal the control plane can act on.

The outputs are a contract with the control plane, which builds each rollback from them (see
docs/actions.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib
import platform
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psutil

from nodeactions import (
    InvalidParameters,
    PowerTarget,
    Problem,
    check_no_parameters,
    describe,
    read_diagnostic_sections,
    read_power_limit,
    read_telemetry_interval,
)
from nodeagent._state import AgentStateStore
from nodeagent.collectors import (
    AsyncGpuCollector,
    CollectorTimeout,
    GpuCallFailed,
    GpuUnavailable,
    PowerLimit,
    UnknownGpu,
)

AGENT_VERSION = "0.1.0"

# A diagnostic report travels in one command result and is stored by the control plane.
MAX_DIAGNOSTIC_BYTES = 64 * 1024
# statvfs on a dead network mount blocks; the report goes out without that section instead.
_HOST_READ_TIMEOUT_S = 5.0

# Actions that need a working GPU; advertised only when one is there.
_GPU_ACTIONS = frozenset({"set_gpu_power_limit"})


class ActionError(Exception):
    """An action refused or failed, with the outcome to report (INVALID_ARGUMENT, FAILED)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome  # INVALID_ARGUMENT, FAILED


class AgentControls:
    """What actions may read and change on the running agent."""

    def __init__(
        self,
        get_interval: Callable[[], float],
        set_interval: Callable[[float], Awaitable[None]],
        *,
        state: AgentStateStore,
        state_dir: pathlib.Path,
        gpu: AsyncGpuCollector | None,
    ) -> None:
        self.get_interval = get_interval
        self.set_interval = set_interval
        self.state = state
        """The agent's durable state (blocking: call it from a worker thread)."""
        self.state_dir = state_dir
        self.gpu = gpu
        """The NVML collector, or None when GPU collection is disabled on this agent."""


Action = Callable[[AgentControls, dict[str, Any]], Awaitable[dict[str, Any]]]
_Request = TypeVar("_Request")


def _invalid(problem: Problem) -> ActionError:
    return ActionError("INVALID_ARGUMENT", describe(problem))


def _read(read: Callable[[dict[str, Any]], _Request], parameters: dict[str, Any]) -> _Request:
    """The parameters as `read` returns them, or its first problem as INVALID_ARGUMENT. The
    readers are `nodeactions`', which check exactly as the control plane checks plan steps."""
    try:
        return read(parameters)
    except InvalidParameters as error:
        raise _invalid(error.problems[0]) from None


def _refuse_any(problems: list[Problem]) -> None:
    if problems:
        raise _invalid(problems[0])


async def ping(controls: AgentControls, parameters: dict[str, Any]) -> dict[str, Any]:
    _refuse_any(check_no_parameters(parameters))
    return {"pong": True, "agent_version": AGENT_VERSION, "unix_time": time.time()}


async def set_telemetry_interval(
    controls: AgentControls, parameters: dict[str, Any]
) -> dict[str, Any]:
    """Sets the telemetry interval. With `restore: true` (a rollback putting back the value the
    agent had before) any positive interval up to the maximum is accepted: the agent may have
    been started with a shorter interval than a plan may request."""
    request = _read(read_telemetry_interval, parameters)
    previous = controls.get_interval()
    await controls.set_interval(request.seconds)
    return {"previous_seconds": previous, "seconds": request.seconds}


# -- set_gpu_power_limit ---------------------------------------------------------------------


def _gpu_of(controls: AgentControls) -> AsyncGpuCollector:
    if controls.gpu is None:
        raise ActionError(
            "FAILED",
            "no NVIDIA GPU or driver on this node: GPU collection is disabled on this agent",
        )
    return controls.gpu


def _unavailable(error: GpuUnavailable) -> ActionError:
    if error.no_gpu:
        return ActionError("FAILED", f"no NVIDIA GPU or driver on this node: {error}")
    return ActionError("FAILED", f"NVML is not usable on this node: {error}")


def _watts(milliwatts: int) -> float:
    return milliwatts / 1000


async def set_gpu_power_limit(
    controls: AgentControls, parameters: dict[str, Any]
) -> dict[str, Any]:
    """Sets GPU power limits, all or nothing: every target is checked against its GPU's range
    before any is changed, and a failure part-way restores the GPUs already changed."""
    request = _read(read_power_limit, parameters)
    gpu = _gpu_of(controls)
    targets = request.targets
    indices = None if targets is None else [target.index for target in targets]
    try:
        limits = await gpu.power_limits(indices)
    except GpuUnavailable as error:
        raise _unavailable(error) from error
    except UnknownGpu as error:
        assert targets is not None  # "all GPUs" names no index that could be unknown
        path = next(t.path for t in targets if t.index == error.index)
        raise _invalid((path, str(error))) from error
    except (GpuCallFailed, CollectorTimeout) as error:
        raise ActionError("FAILED", f"could not read the GPUs' power limits: {error}") from error
    if targets is None:
        assert request.watts is not None
        targets = tuple(PowerTarget(limit.index, request.watts, "watts") for limit in limits)

    planned: list[tuple[PowerTarget, PowerLimit, int]] = []
    for target, limit in zip(targets, limits, strict=True):
        milliwatts = round(target.watts * 1000)
        if not limit.min_milliwatts <= milliwatts <= limit.max_milliwatts:
            low, high = _watts(limit.min_milliwatts), _watts(limit.max_milliwatts)
            outside = f"{target.watts:g} W is outside GPU {limit.index}'s range"
            raise _invalid((target.path, f"{outside} [{low:g}, {high:g}] W"))
        planned.append((target, limit, milliwatts))

    changed: list[PowerLimit] = []
    for _target, limit, milliwatts in planned:
        try:
            await gpu.set_power_limit(limit.index, milliwatts)
        except (GpuCallFailed, CollectorTimeout, GpuUnavailable) as error:
            late = (
                f" (GPU {limit.index} may still change to {_watts(milliwatts):g} W if the call "
                "returns)"
                if isinstance(error, CollectorTimeout) and error.late_result is not None
                else ""
            )
            restored = await _restore_power_limits(gpu, changed)
            raise ActionError(
                "FAILED",
                f"setting GPU {limit.index}'s power limit failed: {error}{late}{restored}",
            ) from error
        changed.append(limit)
    return {
        "gpus": [
            {
                "index": limit.index,
                "uuid": limit.uuid,
                "previous_watts": _watts(limit.milliwatts),
                "watts": _watts(milliwatts),
            }
            for _target, limit, milliwatts in planned
        ]
    }


async def _restore_power_limits(gpu: AsyncGpuCollector, changed: list[PowerLimit]) -> str:
    """Puts back the limits already changed; returns what to add to the failure message."""
    if not changed:
        return "; no GPU was changed"
    restored: list[str] = []
    not_restored: list[str] = []
    for limit in reversed(changed):
        try:
            await gpu.set_power_limit(limit.index, limit.milliwatts)
        except (GpuCallFailed, CollectorTimeout, GpuUnavailable) as error:
            not_restored.append(f"GPU {limit.index} ({error})")
        else:
            restored.append(f"GPU {limit.index} to {_watts(limit.milliwatts):g} W")
    note = ""
    if restored:
        note += "; restored " + ", ".join(reversed(restored))
    if not_restored:
        note += (
            "; could not restore "
            + ", ".join(reversed(not_restored))
            + ": the node's power limits are partly changed"
        )
    return note


# -- run_diagnostic --------------------------------------------------------------------------


async def run_diagnostic(controls: AgentControls, parameters: dict[str, Any]) -> dict[str, Any]:
    """A bounded, read-only health report of the node for a person to read."""
    sections = _read(read_diagnostic_sections, parameters)
    report: dict[str, Any] = {"agent_version": AGENT_VERSION, "generated_at": _utc_iso(time.time())}
    if "gpu" in sections:
        report["gpu"] = await _gpu_report(controls.gpu)
    if "xid" in sections:
        report["xid"] = _xid_report(controls.gpu)
    if "system" in sections:
        report["system"] = await _host_read(_system_report)
    if "disk" in sections:
        report["disk"] = await _host_read(_disk_report, controls.state_dir)
    return _bounded(report, MAX_DIAGNOSTIC_BYTES)


def _utc_iso(unix_time: float) -> str:
    return dt.datetime.fromtimestamp(unix_time, dt.UTC).isoformat(timespec="seconds")


async def _gpu_report(gpu: AsyncGpuCollector | None) -> dict[str, Any]:
    if gpu is None:
        return {"available": False, "reason": "GPU collection is disabled on this agent"}
    try:
        return await gpu.diagnostics()
    except CollectorTimeout as error:
        # The GPU may well be there; what matters to the reader is that NVML is not answering.
        status = gpu.status
        return {
            "available": False,
            "reason": f"NVML did not answer: {error}",
            "driver_version": status.driver_version or "unknown",
            "nvml_version": status.nvml_version,
        }


def _xid_report(gpu: AsyncGpuCollector | None) -> dict[str, Any]:
    events = gpu.recent_xid_events() if gpu is not None else []
    return {
        "events": [
            {
                "time": _utc_iso(event.time_ns / 1e9),
                "xid": event.xid,
                "gpu_index": event.gpu_index,
                "gpu_uuid": event.gpu_uuid,
                "message": event.message,
            }
            for event in events
        ],
    }


async def _host_read(read: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(asyncio.to_thread(read, *args), _HOST_READ_TIMEOUT_S)
    except TimeoutError:
        return {
            "error": f"{read.__name__.strip('_')} did not answer within {_HOST_READ_TIMEOUT_S:g}s"
        }


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.platform())
    except OSError:
        return platform.platform()


def _system_report() -> dict[str, Any]:
    uname = platform.uname()
    report: dict[str, Any] = {
        "hostname": uname.node,
        "os": _os_name(),
        "kernel": f"{uname.system} {uname.release}",
        "kernel_build": uname.version,
        "architecture": uname.machine,
        "python_version": platform.python_version(),
    }
    try:
        boot_time = psutil.boot_time()
    except (OSError, RuntimeError) as error:
        report["uptime_error"] = str(error)
    else:
        report["boot_time"] = _utc_iso(boot_time)
        report["uptime_seconds"] = round(time.time() - boot_time)
    return report


def _disk_report(state_dir: pathlib.Path) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(state_dir)
    except OSError as error:
        return {"path": str(state_dir), "error": str(error)}
    return {
        "path": str(state_dir),
        "total_bytes": usage.total,
        "used_bytes": usage.used,
        "free_bytes": usage.free,
        "used_percent": round(100 * usage.used / usage.total, 1) if usage.total else 0.0,
    }


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


def _longest_list(value: Any, path: str = "") -> tuple[str, list[Any]] | None:
    """The list with the largest serialized size anywhere in `value` (by path), if any."""
    best: tuple[str, list[Any]] | None = None
    best_size = -1
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        if value and (size := _size(value)) > best_size:
            best, best_size = (path, value), size
        children = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    for child_path, child in children:
        found = _longest_list(child, child_path)
        if found is not None and (size := _size(found[1])) > best_size:
            best, best_size = found, size
    return best


def _bounded(report: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """Cuts the largest lists in half until the report fits, noting each cut in `truncated`."""
    cuts: dict[str, tuple[list[Any], int]] = {}  # path -> (the list, its length before cuts)
    while _size(report) > max_bytes:
        found = _longest_list(report)
        if found is None or len(found[1]) <= 1:
            # Nothing left to shorten: say so rather than send a report over the bound.
            return {
                "agent_version": report.get("agent_version", AGENT_VERSION),
                "truncated": [f"the report exceeded {max_bytes} bytes and was dropped"],
            }
        path, items = found
        cuts.setdefault(path, (items, len(items)))
        del items[max(1, len(items) // 2) :]
        report["truncated"] = [
            f"{where}: showing the first {len(kept)} of {total}"
            for where, (kept, total) in sorted(cuts.items())
        ]
    return report


# -- cordon / uncordon -----------------------------------------------------------------------


async def _set_cordoned(
    controls: AgentControls, parameters: dict[str, Any], cordoned: bool
) -> dict[str, Any]:
    _refuse_any(check_no_parameters(parameters))
    previous = await asyncio.to_thread(controls.state.set_cordoned, cordoned)
    return {"cordoned": cordoned, "previous_cordoned": previous}


async def cordon(controls: AgentControls, parameters: dict[str, Any]) -> dict[str, Any]:
    """Marks the node cordoned in Sentinel's scheduling view; idempotent, survives restarts."""
    return await _set_cordoned(controls, parameters, True)


async def uncordon(controls: AgentControls, parameters: dict[str, Any]) -> dict[str, Any]:
    """Clears the cordon mark; idempotent."""
    return await _set_cordoned(controls, parameters, False)


ACTIONS: dict[str, Action] = {
    "cordon": cordon,
    "ping": ping,
    "run_diagnostic": run_diagnostic,
    "set_gpu_power_limit": set_gpu_power_limit,
    "set_telemetry_interval": set_telemetry_interval,
    "uncordon": uncordon,
}


def capabilities(gpu_available: bool) -> list[str]:
    names = [name for name in sorted(ACTIONS) if gpu_available or name not in _GPU_ACTIONS]
    caps = [f"action:{name}" for name in names] + ["telemetry:host"]
    if gpu_available:
        caps.append("telemetry:gpu")
    return caps
