"""The autonomy file (docs/safe-autonomy.md): the breaker's thresholds and the disruption
budgets, as policy data in YAML, read at start."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.policy import AUTONOMY_FILE_NAME

DEFAULT_PAUSE_TIMEOUT_S = 24 * 3600.0


class AutonomyFileInvalid(ValueError):
    """The autonomy file cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class BreakerThresholds:
    """When the autonomy breaker trips; a zero threshold never trips it."""

    max_rollbacks: int = 0
    """Planner plans that rolled back (or failed after a step ran) within `window_s`."""
    max_unhealthy_fraction: float = 0.0
    """Fraction of the fleet unhealthy at once (disconnected or silent, a new XID), in (0, 1]."""
    window_s: float = 3600.0
    """How far back rollbacks and new XIDs count."""
    pause_timeout_s: float = DEFAULT_PAUSE_TIMEOUT_S
    """How long a running planner plan paused by the breaker waits for an operator before it
    rolls back."""


@dataclass(frozen=True, slots=True)
class AutonomyFile:
    """What the autonomy file says; `budgets` are its raw `budgets:` entries (their loader
    lives with the disruption budgets)."""

    breaker: BreakerThresholds
    budgets: tuple[Mapping[str, Any], ...] = ()
    path: str = ""
    """The file read; empty when none was configured or found."""


NO_AUTONOMY_FILE = AutonomyFile(BreakerThresholds())


def autonomy_file_path(autonomy_file: str, policy_paths: str) -> str:
    """The file to read: `autonomy_file` when set, else `autonomy.yaml` in the first directory
    of `policy_paths` that holds one; empty when neither."""
    if autonomy_file:
        return autonomy_file
    for entry in (p.strip() for p in policy_paths.split(",")):
        if entry and (candidate := pathlib.Path(entry) / AUTONOMY_FILE_NAME).is_file():
            return str(candidate)
    return ""


def _number(data: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AutonomyFileInvalid(f"{where}.{key}: a number, not {value!r}")
    if value < 0:
        raise AutonomyFileInvalid(f"{where}.{key}: must not be negative")
    return float(value)


def _breaker(data: Any, where: str) -> BreakerThresholds:
    if data is None:
        return BreakerThresholds()
    if not isinstance(data, Mapping):
        raise AutonomyFileInvalid(f"{where}: a mapping")
    known = {"max_rollbacks", "max_unhealthy_fraction", "window_seconds", "pause_timeout_seconds"}
    if unknown := sorted(set(data) - known):
        raise AutonomyFileInvalid(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: "
            f"{', '.join(sorted(known))}"
        )
    rollbacks = _number(data, "max_rollbacks", where, 0)
    if rollbacks != int(rollbacks):
        raise AutonomyFileInvalid(f"{where}.max_rollbacks: a whole number")
    fraction = _number(data, "max_unhealthy_fraction", where, 0.0)
    if fraction > 1:
        raise AutonomyFileInvalid(f"{where}.max_unhealthy_fraction: at most 1 (a fraction)")
    window = _number(data, "window_seconds", where, 3600.0)
    if window <= 0:
        raise AutonomyFileInvalid(f"{where}.window_seconds: must be positive")
    pause = _number(data, "pause_timeout_seconds", where, DEFAULT_PAUSE_TIMEOUT_S)
    if pause <= 0:
        raise AutonomyFileInvalid(f"{where}.pause_timeout_seconds: must be positive")
    return BreakerThresholds(int(rollbacks), fraction, window, pause)


def load_autonomy_file(path: str) -> AutonomyFile:
    """Reads the autonomy file (empty `path`: none, the breaker never trips and there are no
    budgets). Raises AutonomyFileInvalid naming the file and the field."""
    if not path:
        return NO_AUTONOMY_FILE
    try:
        document = yaml.safe_load(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AutonomyFileInvalid(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise AutonomyFileInvalid(f"{path}: not valid YAML: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise AutonomyFileInvalid(f"{path}: a mapping with `breaker` and `budgets`")
    if unknown := sorted(set(document) - {"breaker", "budgets"}):
        raise AutonomyFileInvalid(
            f"{path}: unknown key(s) {', '.join(map(str, unknown))}; known: breaker, budgets"
        )
    budgets = document.get("budgets") or []
    if not isinstance(budgets, list) or not all(isinstance(b, Mapping) for b in budgets):
        raise AutonomyFileInvalid(f"{path}: budgets: a list of mappings")
    try:
        breaker = _breaker(document.get("breaker"), "breaker")
    except AutonomyFileInvalid as exc:
        raise AutonomyFileInvalid(f"{path}: {exc}") from None
    return AutonomyFile(breaker, tuple(budgets), path)
