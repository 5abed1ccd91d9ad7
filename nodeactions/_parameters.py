"""The parameters of each node action: their names, bounds and checks.

Every check returns all of a parameter set's problems as (path relative to `parameters`,
message), in a fixed order: the control plane reports them all at plan submission, the agent
refuses a command with the first. The `read_*` functions give the agent the checked values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

Problem = tuple[str, str]
"""(field path relative to the action's parameters, message), e.g. ("gpus[1]", "...")."""

MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 3600.0
DIAGNOSTIC_SECTIONS = ("gpu", "xid", "system", "disk")
"""The sections of a diagnostic report, in report order."""

POWER_LIMIT_PARAMETERS = frozenset({"watts", "gpus", "per_gpu_watts"})
TELEMETRY_INTERVAL_PARAMETERS = frozenset({"seconds", "restore"})
DIAGNOSTIC_PARAMETERS = frozenset({"include"})
NO_PARAMETERS: frozenset[str] = frozenset()

_Value = TypeVar("_Value")
_SHOWN_CHARS = 80
_MAX_INDEX_DIGITS = 9  # a GPU index is a few digits; a longer key is a typo, not a GPU


def describe(problem: Problem, prefix: str = "parameters") -> str:
    """The problem as a person reads it: `parameters.gpus[1]: not a GPU index: 1.5`."""
    path, message = problem
    return f"{prefix}.{path}: {message}"


class InvalidParameters(ValueError):
    """A parameter set an action refuses: `problems` holds them all, the one to report first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("InvalidParameters needs at least one problem")
        super().__init__(describe(problems[0]))
        self.problems = tuple(problems)


def _valid(value: _Value | None, problems: list[Problem]) -> _Value:
    """`value`, read where no problem was found (it is None where one was)."""
    if problems:
        raise InvalidParameters(problems)
    assert value is not None
    return value


def _real(value: Any) -> float | None:
    """`value` as a float when it is a finite number (a bool is not one), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int no float can hold
        return None
    return number if math.isfinite(number) else None


def _shown(value: Any) -> str:
    """`value` as a message shows it: its repr, cut short when long."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        return f"<an int of {value.bit_length()} bits>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def is_number(value: Any) -> bool:
    """Whether `value` is a number a parameter may hold: a finite int or float, not a bool."""
    return _real(value) is not None


def _unknown(parameters: Mapping[str, Any], names: frozenset[str]) -> list[Problem]:
    takes = ", ".join(sorted(names)) or "no parameters"
    return [
        (name, f"unknown parameter (this action takes: {takes})")
        for name in sorted(set(parameters) - names)
    ]


# -- set_gpu_power_limit -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PowerTarget:
    """One GPU a power-limit request names, and the watts it asks for that GPU."""

    index: int
    watts: float
    path: str
    """Where the GPU was named, relative to the parameters ("gpus[1]", "per_gpu_watts.3"),
    for messages about that GPU."""


@dataclass(frozen=True, slots=True)
class PowerLimitRequest:
    """What a set_gpu_power_limit command asks for, once its parameters are checked."""

    watts: float | None
    """The watts for every GPU (when `targets` is None) or for the listed ones; None with
    `per_gpu_watts`, where each target carries its own."""
    targets: tuple[PowerTarget, ...] | None
    """The GPUs named (`gpus` in their order, `per_gpu_watts` in index order); None: every GPU."""


def _gpu_index(value: Any) -> int | None:
    # Struct numbers arrive as floats: 2.0 is GPU 2, 2.5 is nothing.
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    number = _real(value)
    return int(number) if number is not None and number >= 0 and number.is_integer() else None


def _listed_gpus(value: Any, problems: list[Problem]) -> list[tuple[int, str]]:
    """(index, path) of each GPU in `gpus`."""
    if not isinstance(value, list) or not value:
        problems.append(("gpus", "must be a non-empty list of GPU indices"))
        return []
    listed: list[tuple[int, str]] = []
    seen: set[int] = set()
    for position, item in enumerate(value):
        path = f"gpus[{position}]"
        index = _gpu_index(item)
        if index is None:
            problems.append((path, f"not a GPU index: {_shown(item)}"))
        elif index in seen:
            problems.append((path, f"GPU {index} is listed twice"))
        else:
            listed.append((index, path))
            seen.add(index)
    return listed


def _per_gpu_targets(value: Any, problems: list[Problem]) -> list[PowerTarget]:
    if not isinstance(value, dict) or not value:
        problems.append(("per_gpu_watts", "must be a non-empty map of GPU index to watts"))
        return []
    targets: list[PowerTarget] = []
    seen: set[int] = set()
    for key, item in value.items():
        path = f"per_gpu_watts.{key}"
        text = str(key)
        if not (text.isascii() and text.isdigit() and len(text) <= _MAX_INDEX_DIGITS):
            problems.append((path, "keys are GPU indices (0, 1, ...)"))
            continue
        index = int(text)
        watts = _real(item)
        if index in seen:  # "1" and "01"
            problems.append((path, f"GPU {index} is listed twice"))
        elif watts is None or watts <= 0:
            problems.append((path, f"must be a positive number of watts, got {_shown(item)}"))
        else:
            targets.append(PowerTarget(index, watts, path))
        seen.add(index)
    return sorted(targets, key=lambda target: target.index)


def _power_limit(parameters: Mapping[str, Any]) -> tuple[PowerLimitRequest | None, list[Problem]]:
    problems = _unknown(parameters, POWER_LIMIT_PARAMETERS)
    has_watts, has_map = "watts" in parameters, "per_gpu_watts" in parameters
    if has_watts == has_map:
        problems.append(("watts", "give exactly one of watts or per_gpu_watts"))
    watts: float | None = None
    if has_watts:
        watts = _real(parameters["watts"])
        if watts is None or watts <= 0:
            given = _shown(parameters["watts"])
            problems.append(("watts", f"must be a positive number of watts, got {given}"))
    if has_map and not has_watts:
        if "gpus" in parameters:
            problems.append(("gpus", "only with watts (per_gpu_watts names its GPUs itself)"))
        targets = _per_gpu_targets(parameters["per_gpu_watts"], problems)
        return (None if problems else PowerLimitRequest(None, tuple(targets))), problems
    if has_map:  # besides watts: refused above, yet its entries are worth checking too
        _per_gpu_targets(parameters["per_gpu_watts"], problems)
    listed = _listed_gpus(parameters["gpus"], problems) if "gpus" in parameters else None
    if problems or watts is None:
        return None, problems
    if listed is None:
        return PowerLimitRequest(watts, None), problems
    return PowerLimitRequest(watts, tuple(PowerTarget(i, watts, path) for i, path in listed)), []


def check_power_limit(parameters: Mapping[str, Any]) -> list[Problem]:
    """Every problem of set_gpu_power_limit's parameters: exactly one of `watts` (for every GPU,
    or with `gpus` for the listed ones) or `per_gpu_watts` (GPU index as text -> watts)."""
    return _power_limit(parameters)[1]


def read_power_limit(parameters: Mapping[str, Any]) -> PowerLimitRequest:
    """set_gpu_power_limit's request; `InvalidParameters` when `check_power_limit` finds any
    problem. Whether the GPUs exist and take the watts is for the agent to find out."""
    return _valid(*_power_limit(parameters))


# -- set_telemetry_interval --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelemetryIntervalRequest:
    """What a set_telemetry_interval command asks for, once its parameters are checked."""

    seconds: float
    restore: bool
    """A rollback putting back the interval the agent had before the plan changed it."""


def _telemetry_interval(
    parameters: Mapping[str, Any],
) -> tuple[TelemetryIntervalRequest | None, list[Problem]]:
    problems = _unknown(parameters, TELEMETRY_INTERVAL_PARAMETERS)
    restore = parameters.get("restore", False)
    if not isinstance(restore, bool):
        problems.append(("restore", "must be true or false"))
        restore = False
    seconds = _real(parameters.get("seconds"))
    if seconds is None:
        problems.append(("seconds", "required, a number of seconds"))
        return None, problems
    # A rollback puts back whatever the agent ran with, which may be under the minimum a plan
    # may ask for: the agent's own setting (telemetry_interval_s) is not bound by it.
    high_enough = seconds > 0 if restore else seconds >= MIN_INTERVAL_S
    if not high_enough or seconds > MAX_INTERVAL_S:
        bounds = f"[{MIN_INTERVAL_S:g}, {MAX_INTERVAL_S:g}]"
        problems.append(("seconds", f"{seconds:g} is outside {bounds}"))
    return (None if problems else TelemetryIntervalRequest(seconds, restore)), problems


def check_telemetry_interval(parameters: Mapping[str, Any]) -> list[Problem]:
    """Every problem of set_telemetry_interval's parameters: `seconds` within [1, 3600]; with
    `restore: true` any positive number of seconds up to 3600."""
    return _telemetry_interval(parameters)[1]


def read_telemetry_interval(parameters: Mapping[str, Any]) -> TelemetryIntervalRequest:
    """set_telemetry_interval's request; `InvalidParameters` when the check finds any problem."""
    return _valid(*_telemetry_interval(parameters))


# -- run_diagnostic ----------------------------------------------------------------------------


def _diagnostic(parameters: Mapping[str, Any]) -> tuple[tuple[str, ...] | None, list[Problem]]:
    problems = _unknown(parameters, DIAGNOSTIC_PARAMETERS)
    include = parameters.get("include")
    if include is None:
        return DIAGNOSTIC_SECTIONS, problems
    if not isinstance(include, list):
        problems.append(("include", "must be a list of section names"))
        return None, problems
    known = ", ".join(sorted(DIAGNOSTIC_SECTIONS))
    for position, name in enumerate(include):
        if not isinstance(name, str) or name not in DIAGNOSTIC_SECTIONS:
            problems.append((f"include[{position}]", f"unknown section {_shown(name)} ({known})"))
    sections = tuple(name for name in DIAGNOSTIC_SECTIONS if name in include)
    return (None if problems else sections), problems


def check_diagnostic(parameters: Mapping[str, Any]) -> list[Problem]:
    """Every problem of run_diagnostic's parameters: optional `include`, a list of sections."""
    return _diagnostic(parameters)[1]


def read_diagnostic_sections(parameters: Mapping[str, Any]) -> tuple[str, ...]:
    """The sections run_diagnostic is asked for, in report order (all without `include`);
    `InvalidParameters` when the check finds any problem."""
    return _valid(*_diagnostic(parameters))


# -- cordon, uncordon, ping --------------------------------------------------------------------


def check_no_parameters(parameters: Mapping[str, Any]) -> list[Problem]:
    """Every problem of an action that takes no parameters: each one given is unknown."""
    return _unknown(parameters, NO_PARAMETERS)


# -- all actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionParameters:
    """What one node action takes: the names of its parameters and their check."""

    names: frozenset[str]
    check: Callable[[Mapping[str, Any]], list[Problem]]


ACTION_PARAMETERS: Mapping[str, ActionParameters] = MappingProxyType(
    {
        "set_gpu_power_limit": ActionParameters(POWER_LIMIT_PARAMETERS, check_power_limit),
        "set_telemetry_interval": ActionParameters(
            TELEMETRY_INTERVAL_PARAMETERS, check_telemetry_interval
        ),
        "run_diagnostic": ActionParameters(DIAGNOSTIC_PARAMETERS, check_diagnostic),
        "cordon": ActionParameters(NO_PARAMETERS, check_no_parameters),
        "uncordon": ActionParameters(NO_PARAMETERS, check_no_parameters),
        "ping": ActionParameters(NO_PARAMETERS, check_no_parameters),
    }
)
"""Every node action by name."""
