"""The commands an agent carries out. Each action validates its parameters and returns its
output; `ActionError` with an outcome reports a refusal the control plane can act on."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

AGENT_VERSION = "0.1.0"

MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 3600.0


class ActionError(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome  # INVALID_ARGUMENT, FAILED


class AgentControls:
    """What actions may change on the running agent."""

    def __init__(
        self,
        get_interval: Callable[[], float],
        set_interval: Callable[[float], Awaitable[None]],
    ) -> None:
        self.get_interval = get_interval
        self.set_interval = set_interval


Action = Callable[[AgentControls, dict[str, Any]], Awaitable[dict[str, Any]]]


async def ping(controls: AgentControls, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "agent_version": AGENT_VERSION, "unix_time": time.time()}


async def set_telemetry_interval(
    controls: AgentControls, parameters: dict[str, Any]
) -> dict[str, Any]:
    seconds = parameters.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ActionError("INVALID_ARGUMENT", "parameters.seconds: required, a number of seconds")
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        raise ActionError(
            "INVALID_ARGUMENT",
            f"parameters.seconds: {seconds:g} is outside [{MIN_INTERVAL_S:g}, {MAX_INTERVAL_S:g}]",
        )
    previous = controls.get_interval()
    await controls.set_interval(float(seconds))
    return {"previous_seconds": previous, "seconds": float(seconds)}


ACTIONS: dict[str, Action] = {
    "ping": ping,
    "set_telemetry_interval": set_telemetry_interval,
}


def capabilities(gpu_available: bool) -> list[str]:
    caps = [f"action:{name}" for name in sorted(ACTIONS)] + ["telemetry:host"]
    if gpu_available:
        caps.append("telemetry:gpu")
    return caps
