"""What plans may ask of Kubernetes: the actions, which kinds of object each acts on, and how
their targets and parameters are checked at submission (every problem, with its path)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from controlplane.executors._protocol import KubernetesObject, Problems

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

MAX_REPLICAS = 10_000
MAX_EVICTIONS_IN_PARALLEL = 50

KINDS: dict[str, frozenset[str]] = {
    "scale": frozenset({"Deployment", "StatefulSet"}),
    "rollout": frozenset({"Deployment"}),
    "restart": frozenset({"Deployment", "StatefulSet"}),
    "cordon": frozenset({"Node"}),
    "uncordon": frozenset({"Node"}),
    "drain": frozenset({"Node"}),
}
"""Each action and the kinds of object it acts on."""

STRATEGIES = ("rolling", "canary", "blue_green")
"""Rollout strategies this executor carries out."""
MAX_SCALE_DOWN_DELAY_S = 3600.0
DEFAULT_SCALE_DOWN_DELAY_S = 30.0
"""How long blue/green keeps the old version serving-ready after the switch."""
DEFAULT_WEIGHTS = (10, 50, 100)
"""A canary's share of the replicas at each stage, in percent, when the plan gives none."""


def check_target(target: KubernetesObject, action: str, clusters: Collection[str]) -> Problems:
    """Problems of one Kubernetes target, paths relative to the target."""
    problems: Problems = []
    if target.cluster not in clusters:
        configured = ", ".join(sorted(clusters)) or "none configured"
        problems.append(
            ("kubernetes.cluster", f"unknown cluster {target.cluster!r} (clusters: {configured})")
        )
    kinds = KINDS[action]
    if target.kind not in kinds:
        problems.append(
            (
                "kubernetes.kind",
                f"{action} acts on {' or '.join(sorted(kinds))}, not {target.kind!r}",
            )
        )
    if target.kind == "Node":
        if target.namespace:
            problems.append(("kubernetes.namespace", "nodes have no namespace: leave it empty"))
    elif not _DNS_LABEL.match(target.namespace):
        problems.append(("kubernetes.namespace", f"not a namespace name: {target.namespace!r}"))
    if not _DNS_SUBDOMAIN.match(target.name):
        problems.append(("kubernetes.name", f"not an object name: {target.name!r}"))
    return problems


def _unknown(parameters: Mapping[str, Any], known: set[str], problems: Problems) -> None:
    for name in sorted(set(parameters) - known):
        takes = ", ".join(sorted(known)) or "no parameters"
        problems.append((name, f"unknown parameter (this action takes: {takes})"))


def _whole(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value  # not NaN
        and int(value) == value
    )


def _check_surge(parameters: Mapping[str, Any], name: str, problems: Problems) -> None:
    if name not in parameters:
        return
    value = parameters[name]
    if isinstance(value, str):
        if not _PERCENT.match(value):
            problems.append((name, f"a percentage like '25%' or a whole number, got {value!r}"))
    elif not _whole(value) or value < 0:
        problems.append((name, f"a whole number >= 0 or a percentage, got {value!r}"))


def check_parameters(action: str, parameters: Mapping[str, Any]) -> Problems:
    """Problems of a step's parameters, paths relative to `parameters`."""
    problems: Problems = []
    if action == "scale":
        _unknown(parameters, {"replicas"}, problems)
        replicas = parameters.get("replicas")
        if replicas is None or not _whole(replicas) or not 0 <= replicas <= MAX_REPLICAS:
            problems.append(("replicas", f"required, a whole number in [0, {MAX_REPLICAS}]"))
    elif action == "rollout":
        known = {
            "container",
            "image",
            "env",
            "strategy",
            "max_surge",
            "max_unavailable",
            "weights",
            "service",
            "scale_down_delay_s",
        }
        _unknown(parameters, known, problems)
        container = parameters.get("container")
        if not isinstance(container, str) or not _DNS_LABEL.match(container):
            problems.append(("container", "required: the name of the container to change"))
        image, env = parameters.get("image"), parameters.get("env")
        if image is None and env is None:
            problems.append(("image", "give image, env or both"))
        if image is not None and (not isinstance(image, str) or not image or " " in image):
            problems.append(("image", f"not an image reference: {image!r}"))
        if env is not None:
            if not isinstance(env, dict) or not env:
                problems.append(("env", "a non-empty map of variable name to value"))
            else:
                for key, value in env.items():
                    if not _ENV_NAME.match(str(key)):
                        problems.append((f"env.{key}", "not an environment variable name"))
                    elif not isinstance(value, str):
                        problems.append((f"env.{key}", "values are strings"))
        strategy = parameters.get("strategy", "rolling")
        supported = ", ".join(STRATEGIES)
        if strategy not in STRATEGIES:
            problems.append(("strategy", f"unknown strategy {strategy!r}; supported: {supported}"))
        if "weights" in parameters:
            _check_weights(parameters["weights"], strategy, problems)
        _check_blue_green(parameters, strategy, problems)
        _check_surge(parameters, "max_surge", problems)
        _check_surge(parameters, "max_unavailable", problems)
        if parameters.get("max_surge") in (0, "0%") and parameters.get("max_unavailable") in (
            0,
            "0%",
        ):
            problems.append(("max_unavailable", "max_surge and max_unavailable cannot both be 0"))
    elif action == "drain":
        _unknown(parameters, {"delete_emptydir_data", "force", "max_parallel"}, problems)
        for flag in ("delete_emptydir_data", "force"):
            if flag in parameters and not isinstance(parameters[flag], bool):
                problems.append((flag, "must be true or false"))
        if "max_parallel" in parameters:
            value = parameters["max_parallel"]
            if not _whole(value) or not 1 <= value <= MAX_EVICTIONS_IN_PARALLEL:
                problems.append(
                    ("max_parallel", f"a whole number in [1, {MAX_EVICTIONS_IN_PARALLEL}]")
                )
    else:  # restart, cordon, uncordon
        _unknown(parameters, set(), problems)
    return problems


def _check_weights(weights: Any, strategy: Any, problems: Problems) -> None:
    if strategy != "canary":
        problems.append(("weights", "only a canary rollout has weights"))
        return
    if not isinstance(weights, list) or not weights:
        problems.append(("weights", "a list of percentages, e.g. [10, 50, 100]"))
        return
    last = 0.0
    for i, weight in enumerate(weights):
        if not _whole(weight) or not 0 < weight <= 100:
            problems.append((f"weights[{i}]", f"a whole percentage in (0, 100], got {weight!r}"))
        elif weight <= last:
            problems.append((f"weights[{i}]", "weights must increase"))
        else:
            last = float(weight)


def _check_blue_green(parameters: Mapping[str, Any], strategy: Any, problems: Problems) -> None:
    service = parameters.get("service")
    delay = parameters.get("scale_down_delay_s")
    if strategy != "blue_green":
        for name in ("service", "scale_down_delay_s"):
            if name in parameters:
                problems.append((name, "only a blue_green rollout takes it"))
        return
    if not isinstance(service, str) or not _DNS_LABEL.match(service):
        problems.append(("service", "required: the Service that selects the Deployment's pods"))
    if delay is not None and (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0 <= delay <= MAX_SCALE_DOWN_DELAY_S
    ):
        problems.append(("scale_down_delay_s", f"seconds in [0, {MAX_SCALE_DOWN_DELAY_S:g}]"))
