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

from controlplane.executors import KUBERNETES_ACTIONS, NODE_ACTIONS
from controlplane.plans._model import Plan

_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
_NODE_ID = _ID
MAX_TEXT = 10_000
MAX_STEP_TIMEOUT_S = 24 * 3600.0
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_GATE_WINDOW_S = 3600.0


class PlanInvalid(ValueError):
    """The plan cannot be accepted as written; `problems` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class PlanLimitsConfig:
    max_steps: int
    max_targets: int


def validate_plan(
    plan: Plan,
    *,
    now: dt.datetime,
    limits: PlanLimitsConfig,
    node_known: Callable[[str], bool],
    check_expression: Callable[[str], str | None],
) -> list[tuple[str, str]]:
    """Problems of `plan` as (path, message), paths rooted at `plan`; empty when well-formed.

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
        action = NODE_ACTIONS.get(step.action)
        if action is None:
            supported = ", ".join(sorted(NODE_ACTIONS))
            if step.action in KUBERNETES_ACTIONS:
                bad(
                    f"{at}.action",
                    f"{step.action!r} needs the Kubernetes executor, which this control plane "
                    f"does not have yet; supported actions: {supported}",
                )
            else:
                bad(f"{at}.action", f"unknown action {step.action!r}; supported: {supported}")
            continue
        if not 0 < step.timeout_s <= MAX_STEP_TIMEOUT_S:
            bad(f"{at}.timeout", f"must be within (0, {MAX_STEP_TIMEOUT_S:g}] seconds")
        if not step.targets:
            bad(f"{at}.targets", "a step needs at least one target")
        elif len(step.targets) > limits.max_targets:
            bad(f"{at}.targets", f"at most {limits.max_targets} targets, got {len(step.targets)}")
        seen: dict[str, int] = {}
        for i, target in enumerate(step.targets):
            where = f"{at}.targets[{i}]"
            if target.kubernetes is not None or not target.node_id:
                bad(where, f"{step.action} acts on nodes: set node_id")
            elif not _NODE_ID.match(target.node_id):
                bad(f"{where}.node_id", f"not a node id: {target.node_id!r}")
            elif target.node_id in seen:
                bad(f"{where}.node_id", f"duplicate of {at}.targets[{seen[target.node_id]}]")
            elif not node_known(target.node_id):
                bad(f"{where}.node_id", f"no agent {target.node_id!r} has ever registered")
            else:
                seen[target.node_id] = i
        for path, message in action.check(step.parameters):
            bad(f"{at}.parameters.{path}", message)

    names: set[str] = set()
    for i, gate in enumerate(plan.health_gates):
        at = f"health_gates[{i}]"
        if not _ID.match(gate.name):
            bad(f"{at}.name", "required: 1-128 letters, digits, '.', '_' or '-'")
        elif gate.name in names:
            bad(f"{at}.name", f"duplicate gate name {gate.name!r}")
        names.add(gate.name)
        if not gate.expression.strip():
            bad(f"{at}.expression", "required: a CEL expression over `sample`")
        else:
            error = check_expression(gate.expression)
            if error is not None:
                bad(f"{at}.expression", error)
        if not 0 < gate.window_s <= MAX_GATE_WINDOW_S:
            bad(f"{at}.window", f"must be within (0, {MAX_GATE_WINDOW_S:g}] seconds")

    if plan.limits.max_nodes_in_parallel < 1:
        bad("limits.max_nodes_in_parallel", "must be at least 1")
    if not 0 <= plan.limits.deadline_s <= MAX_DEADLINE_S:
        bad("limits.deadline", f"must be within [0, {MAX_DEADLINE_S:g}] seconds")
    return problems
