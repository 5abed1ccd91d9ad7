"""The node-scoped actions plans may use: how their parameters are checked before a plan is
accepted, and how each one is undone from what the agent reported when it acted.

Parameters are checked by `nodeactions`, exactly as the agent checks them before it acts, so a
plan with an impossible step is refused at submission, not half-way through. Only what needs
the node itself (a GPU's real power range, whether a GPU index exists) is left to the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeactions import (
    check_diagnostic,
    check_no_parameters,
    check_power_limit,
    check_telemetry_interval,
    is_number,
    read_power_limit,
)

Problems = list[tuple[str, str]]  # (field path relative to the step's parameters, message)
Inverse = tuple[str, dict[str, Any]] | None  # (action, parameters) that undoes it, or None


def power_limit_gpus(parameters: dict[str, Any]) -> frozenset[int] | None:
    """The GPU indices a set_gpu_power_limit step sets; None for all of the node's GPUs (and
    for parameters that do not check, which validation refuses anyway)."""
    try:
        request = read_power_limit(parameters)
    except ValueError:
        return None
    if request.targets is None:
        return None
    return frozenset(target.index for target in request.targets)


def _undo_power_limit(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    previous = {
        str(int(gpu["index"])): float(gpu["previous_watts"])
        for gpu in output.get("gpus", [])
        if "index" in gpu and "previous_watts" in gpu
    }
    return ("set_gpu_power_limit", {"per_gpu_watts": previous}) if previous else None


def _undo_interval(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    previous = output.get("previous_seconds")
    if not is_number(previous):
        return None
    return ("set_telemetry_interval", {"seconds": previous, "restore": True})


def _undo_cordon(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    return None if output.get("previous_cordoned", False) else ("uncordon", {})


def _undo_uncordon(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    return ("cordon", {}) if output.get("previous_cordoned", False) else None


def _nothing_to_undo(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    return None


@dataclass(frozen=True, slots=True)
class NodeAction:
    """One action agents carry out: how its parameters are checked and how it is undone."""

    name: str
    check: Callable[[dict[str, Any]], Problems]
    inverse: Callable[[dict[str, Any], dict[str, Any]], Inverse]
    allowed_on_cordoned: bool = False
    """A cordoned node takes no new work, except what helps bring it back."""


NODE_ACTIONS: dict[str, NodeAction] = {
    a.name: a
    for a in (
        NodeAction("set_gpu_power_limit", check_power_limit, _undo_power_limit),
        NodeAction("set_telemetry_interval", check_telemetry_interval, _undo_interval),
        NodeAction("run_diagnostic", check_diagnostic, _nothing_to_undo, allowed_on_cordoned=True),
        NodeAction("cordon", check_no_parameters, _undo_cordon, allowed_on_cordoned=True),
        NodeAction("uncordon", check_no_parameters, _undo_uncordon, allowed_on_cordoned=True),
    )
}
