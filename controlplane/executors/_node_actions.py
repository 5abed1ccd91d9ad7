"""The node-scoped actions plans may use: how their parameters are checked before a plan is
accepted, and how each one is undone from what the agent reported when it acted.

The agent checks parameters again against the real hardware (a GPU's power range); checking
here too means a plan with an impossible step is refused at submission, not half-way through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Problems = list[tuple[str, str]]  # (field path relative to the step's parameters, message)
Inverse = tuple[str, dict[str, Any]] | None  # (action, parameters) that undoes it, or None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _no_unknown(parameters: dict[str, Any], known: set[str], problems: Problems) -> None:
    for name in sorted(set(parameters) - known):
        allowed = ", ".join(sorted(known)) or "none"
        problems.append((name, f"unknown parameter (this action takes: {allowed})"))


def _check_power_limit(p: dict[str, Any]) -> Problems:
    problems: Problems = []
    _no_unknown(p, {"watts", "gpus", "per_gpu_watts"}, problems)
    has_watts, has_map = "watts" in p, "per_gpu_watts" in p
    if has_watts == has_map:
        problems.append(("watts", "give exactly one of watts or per_gpu_watts"))
    if has_watts and (not _number(p["watts"]) or p["watts"] <= 0):
        problems.append(("watts", f"must be a positive number of watts, got {p['watts']!r}"))
    if has_map:
        table = p["per_gpu_watts"]
        if not isinstance(table, dict) or not table:
            problems.append(("per_gpu_watts", "must be a non-empty map of GPU index to watts"))
        else:
            for key, value in table.items():
                if not str(key).isdigit():
                    problems.append((f"per_gpu_watts.{key}", "keys are GPU indices (0, 1, ...)"))
                elif not _number(value) or value <= 0:
                    problems.append((f"per_gpu_watts.{key}", "must be a positive number of watts"))
    if "gpus" in p:
        gpus = p["gpus"]
        if not isinstance(gpus, list) or not gpus:
            problems.append(("gpus", "must be a non-empty list of GPU indices"))
        else:
            for i, index in enumerate(gpus):
                if not _number(index) or index < 0 or int(index) != index:
                    problems.append((f"gpus[{i}]", f"not a GPU index: {index!r}"))
    return problems


def _undo_power_limit(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    previous = {
        str(int(gpu["index"])): float(gpu["previous_watts"])
        for gpu in output.get("gpus", [])
        if "index" in gpu and "previous_watts" in gpu
    }
    return ("set_gpu_power_limit", {"per_gpu_watts": previous}) if previous else None


def _check_interval(p: dict[str, Any]) -> Problems:
    problems: Problems = []
    _no_unknown(p, {"seconds", "restore"}, problems)
    seconds: Any = p.get("seconds")
    restore = p.get("restore", False)
    if not isinstance(restore, bool):
        problems.append(("restore", "must be true or false"))
    if not _number(seconds):
        problems.append(("seconds", "required, a number of seconds"))
    elif restore is True and 0 < float(seconds) <= 3600.0:
        pass  # a rollback puts back whatever the agent ran with
    elif not 1.0 <= float(seconds) <= 3600.0:
        problems.append(("seconds", f"{float(seconds):g} is outside [1, 3600]"))
    return problems


def _undo_interval(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    previous = output.get("previous_seconds")
    if not _number(previous):
        return None
    return ("set_telemetry_interval", {"seconds": previous, "restore": True})


_DIAGNOSTIC_SECTIONS = frozenset({"gpu", "xid", "system", "disk"})


def _check_diagnostic(p: dict[str, Any]) -> Problems:
    problems: Problems = []
    _no_unknown(p, {"include"}, problems)
    include = p.get("include")
    if include is not None:
        if not isinstance(include, list):
            problems.append(("include", "must be a list of section names"))
        else:
            for i, name in enumerate(include):
                if not isinstance(name, str) or name not in _DIAGNOSTIC_SECTIONS:
                    known = ", ".join(sorted(_DIAGNOSTIC_SECTIONS))
                    problems.append((f"include[{i}]", f"unknown section {name!r} ({known})"))
    return problems


def _no_parameters(p: dict[str, Any]) -> Problems:
    problems: Problems = []
    _no_unknown(p, set(), problems)
    return problems


def _undo_cordon(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    return None if output.get("previous_cordoned", False) else ("uncordon", {})


def _undo_uncordon(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    return ("cordon", {}) if output.get("previous_cordoned", False) else None


def _nothing_to_undo(parameters: dict[str, Any], output: dict[str, Any]) -> Inverse:
    return None


@dataclass(frozen=True, slots=True)
class NodeAction:
    name: str
    check: Callable[[dict[str, Any]], Problems]
    inverse: Callable[[dict[str, Any], dict[str, Any]], Inverse]
    allowed_on_cordoned: bool = False
    """A cordoned node takes no new work, except what helps bring it back."""


NODE_ACTIONS: dict[str, NodeAction] = {
    a.name: a
    for a in (
        NodeAction("set_gpu_power_limit", _check_power_limit, _undo_power_limit),
        NodeAction("set_telemetry_interval", _check_interval, _undo_interval),
        NodeAction("run_diagnostic", _check_diagnostic, _nothing_to_undo, allowed_on_cordoned=True),
        NodeAction("cordon", _no_parameters, _undo_cordon, allowed_on_cordoned=True),
        NodeAction("uncordon", _no_parameters, _undo_uncordon, allowed_on_cordoned=True),
    )
}

# Actions of the architecture that need the Kubernetes executor, which is not built yet.
KUBERNETES_ACTIONS = frozenset({"scale", "rollout", "restart", "drain"})
