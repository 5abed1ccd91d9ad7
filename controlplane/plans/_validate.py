"""Structural checks of a submitted plan: every problem at once, each with its field path.

Policy (what a plan may do) is the policy engine's business; this module only decides whether
the plan is well-formed and executable by this control plane.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.analysis import check_gate
from controlplane.executors import Executors, TargetKind
from controlplane.plans._drift import drift_pattern_problem, precondition_expression_problem
from controlplane.plans._model import Plan
from controlplane.plans._predictions import prediction_problems

_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
MAX_TEXT = 10_000
MAX_STEP_TIMEOUT_S = 24 * 3600.0
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_GATE_WINDOW_S = 3600.0
MAX_PAUSE_S = 7 * 24 * 3600.0
MAX_PRECONDITIONS = 50
MAX_DRIFT_PATTERNS = 100


class PlanInvalid(ValueError):
    """The plan cannot be accepted as written; `problems` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class PlanLimitsConfig:
    """The control plane's own bounds on a plan's size."""

    max_steps: int
    max_targets: int


def validate_plan(
    plan: Plan,
    *,
    now: dt.datetime,
    limits: PlanLimitsConfig,
    executors: Executors,
    check_expression: Callable[[str], str | None],
) -> list[tuple[str, str]]:
    """Problems of `plan` as (path, message), paths rooted at `plan`; empty when well-formed.

    Each step's targets and parameters are checked by the executor of the targets' kind.
    `check_expression` returns why a health-gate expression does not compile, or None.
    """
    problems: list[tuple[str, str]] = []

    def bad(path: str, message: str) -> None:
        problems.append((f"plan.{path}", message))

    if not plan.source.strip():
        bad("source", "required: who proposes the plan (e.g. 'inframind')")
    elif len(plan.source) > 128:
        bad("source", "at most 128 characters")
    if len(plan.rationale) > MAX_TEXT:
        bad("rationale", f"at most {MAX_TEXT} characters")
    if not math.isfinite(plan.confidence) or not 0.0 <= plan.confidence <= 1.0:
        bad("confidence", f"must be within [0, 1], got {plan.confidence}")
    if len(plan.request_id) > 128:
        bad("request_id", "at most 128 characters")
    for name in ("source", "rationale", "request_id"):
        if "\x00" in getattr(plan, name):
            bad(name, "must not contain NUL characters")
    if plan.expire_at is not None and plan.expire_at <= now:
        bad("expire_time", f"{plan.expire_at.isoformat()} has already passed")

    if not plan.steps:
        bad("steps", "a plan needs at least one step")
    elif len(plan.steps) > limits.max_steps:
        bad("steps", f"at most {limits.max_steps} steps, got {len(plan.steps)}")
    step_ids: dict[str, int] = {}
    for step in plan.steps:
        at = f"steps[{step.index}]"
        if not _ID.match(step.step_id):
            bad(f"{at}.step_id", "1-128 letters, digits, '.', '_' or '-'")
        elif step.step_id in step_ids:
            bad(f"{at}.step_id", f"duplicate of steps[{step_ids[step.step_id]}].step_id")
        else:
            step_ids[step.step_id] = step.index
        if not step.action:
            bad(f"{at}.action", "required")
            continue
        if not 0 < step.timeout_s <= MAX_STEP_TIMEOUT_S:
            bad(f"{at}.timeout", f"must be within (0, {MAX_STEP_TIMEOUT_S:g}] seconds")
        if not step.targets:
            bad(f"{at}.targets", "a step needs at least one target")
            continue
        if len(step.targets) > limits.max_targets:
            bad(f"{at}.targets", f"at most {limits.max_targets} targets, got {len(step.targets)}")
        kinds = {target.kind for target in step.targets}
        if len(kinds) > 1:
            bad(f"{at}.targets", "all targets of a step must be of one kind (nodes or objects)")
            continue
        kind = kinds.pop()
        executor = executors.for_kind(kind)
        if executor is None or step.action not in executor.actions:
            bad(f"{at}.action", _unknown_action(step.action, kind, executors))
            continue
        seen: dict[str, int] = {}
        for i, target in enumerate(step.targets):
            where = f"{at}.targets[{i}]"
            target_problems = executor.check_target(step.action, target)
            for path, message in target_problems:
                bad(f"{where}.{path}" if path else where, message)
            key = target.result_key
            if target_problems:
                continue
            if key in seen:
                field = ".node_id" if kind == TargetKind.NODE else ""
                bad(f"{where}{field}", f"duplicate of {at}.targets[{seen[key]}]")
            else:
                seen[key] = i
        for path, message in executor.check_parameters(step.action, step.parameters):
            bad(f"{at}.parameters.{path}", message)

    names: set[str] = set()
    for i, gate in enumerate(plan.health_gates):
        at = f"health_gates[{i}]"
        if not _ID.match(gate.name):
            bad(f"{at}.name", "required: 1-128 letters, digits, '.', '_' or '-'")
        elif gate.name in names:
            bad(f"{at}.name", f"duplicate gate name {gate.name!r}")
        names.add(gate.name)
        if gate.pause_on_inconclusive and gate.prometheus is None:
            bad(f"{at}.on_inconclusive", "PAUSE applies to prometheus gates only")
        if not 0 < gate.pause_timeout_s <= MAX_PAUSE_S:
            bad(f"{at}.pause_timeout", f"must be within (0, {MAX_PAUSE_S:g}] seconds")
        if gate.prometheus is not None:
            if gate.expression.strip():
                bad(f"{at}.expression", "give an expression or a prometheus query, not both")
            for path, message in check_gate(gate.prometheus):
                if path != "name":  # the gate's own name, checked above
                    bad(f"{at}.prometheus.{path}", message)
            continue
        if not gate.expression.strip():
            bad(f"{at}.expression", "required: a CEL expression over `sample`")
        else:
            error = check_expression(gate.expression)
            if error is not None:
                bad(f"{at}.expression", error)
        if not 0 < gate.window_s <= MAX_GATE_WINDOW_S:
            bad(f"{at}.window", f"must be within (0, {MAX_GATE_WINDOW_S:g}] seconds")

    for path, message in prediction_problems(plan.predictions):
        bad(path, message)

    if len(plan.preconditions) > MAX_PRECONDITIONS:
        bad("preconditions", f"at most {MAX_PRECONDITIONS}, got {len(plan.preconditions)}")
    precondition_names: dict[str, int] = {}
    for i, precondition in enumerate(plan.preconditions[:MAX_PRECONDITIONS]):
        at = f"preconditions[{i}]"
        if not _ID.match(precondition.name):
            bad(f"{at}.name", "required: 1-128 letters, digits, '.', '_' or '-'")
        elif precondition.name in precondition_names:
            first = precondition_names[precondition.name]
            bad(f"{at}.name", f"duplicate of preconditions[{first}]")
        else:
            precondition_names[precondition.name] = i
        if not precondition.expression.strip():
            bad(f"{at}.expression", "required: a CEL expression over `target`, `state`, `sample`")
        else:
            error = precondition_expression_problem(precondition.expression)
            if error is not None:
                bad(f"{at}.expression", error)
    if len(plan.allow_drift) > MAX_DRIFT_PATTERNS:
        bad("allow_drift", f"at most {MAX_DRIFT_PATTERNS} patterns, got {len(plan.allow_drift)}")
    for i, pattern in enumerate(plan.allow_drift[:MAX_DRIFT_PATTERNS]):
        error = drift_pattern_problem(pattern)
        if error is not None:
            bad(f"allow_drift[{i}]", error)

    if plan.limits.max_nodes_in_parallel < 1:
        bad("limits.max_nodes_in_parallel", "must be at least 1")
    if not 0 <= plan.limits.deadline_s <= MAX_DEADLINE_S:
        bad("limits.deadline", f"must be within [0, {MAX_DEADLINE_S:g}] seconds")
    return problems


def _unknown_action(action: str, kind: TargetKind, executors: Executors) -> str:
    executor = executors.for_kind(kind)
    if executor is None:
        message = f"{action!r} on {kind} targets: this control plane has no executor for them"
    else:
        supported = ", ".join(sorted(executor.actions))
        message = f"unknown action {action!r} for {kind} targets; supported: {supported}"
    missing = executors.missing_kinds()
    if TargetKind.KUBERNETES in missing:
        message += (
            "; actions on Kubernetes objects (scale, rollout, restart, drain) need the "
            "Kubernetes executor, which runs only where clusters are configured "
            "(setting kubernetes_clusters)"
        )
    return message
