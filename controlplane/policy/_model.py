"""What policies are made of (rules in CEL) and what evaluating them yields (violations, a
verdict), as plain frozen data shared by the engine, the YAML loader and the store."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Effect(enum.StrEnum):
    """What a violated rule does to the plan."""

    REJECT = "REJECT"
    REQUIRE_APPROVAL = "REQUIRE_APPROVAL"


class Scope(enum.StrEnum):
    """PLAN rules are evaluated once per plan; STEP rules once per step (with `step`, `index`)."""

    PLAN = "PLAN"
    STEP = "STEP"


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy rule: a CEL expression, its scope, effect and message."""

    rule_id: str
    expression: str
    """CEL that must evaluate to true for the plan to pass."""
    message: str
    """What a person reads when the rule is violated."""
    field: str = ""
    """The plan field the rule concerns; "{index}" becomes the step index in STEP rules."""
    effect: Effect = Effect.REJECT
    scope: Scope = Scope.PLAN


@dataclass(frozen=True, slots=True)
class Policy:
    """A named set of rules, as loaded from a file or created through the API."""

    policy_id: str
    description: str
    rules: tuple[Rule, ...]
    enabled: bool = True
    origin: str = "api"
    """"api", or "file:<path>" for policies loaded from YAML at start (read-only via the API)."""
    updated_at: dt.datetime | None = None


class PolicyInvalid(ValueError):
    """A policy that cannot be used; `problems` lists every (field path, message) at once,
    paths relative to the policy (e.g. "rules[2].expression")."""

    def __init__(self, problems: list[tuple[str, str]], where: str = "") -> None:
        self.problems = problems
        self.where = where
        text = "; ".join(f"{path}: {message}" if path else message for path, message in problems)
        super().__init__(f"{where}: {text}" if where else text)


@dataclass(frozen=True, slots=True)
class Violation:
    """A policy rule a plan broke, with its effect and the field it concerns."""

    rule_id: str
    message: str
    field: str
    effect: Effect
    policy_id: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of evaluating every policy on a plan: rejections and approvals required."""

    rejections: tuple[Violation, ...]
    approvals_required: tuple[Violation, ...]

    @property
    def outcome(self) -> str:
        """ "REJECTED" | "AWAITING_APPROVAL" | "APPROVED"."""
        if self.rejections:
            return "REJECTED"
        if self.approvals_required:
            return "AWAITING_APPROVAL"
        return "APPROVED"

    @property
    def violations(self) -> tuple[Violation, ...]:
        """Rejections first, then approvals required, each in evaluation order."""
        return (*self.rejections, *self.approvals_required)


@dataclass(frozen=True, slots=True)
class EvaluationContext:
    """What rules may know besides the plan itself."""

    now: dt.datetime
    """UTC-aware; the `now` of rules (tests supply it, so time windows are deterministic)."""
    fleet_size: int
    """Registered agents."""
    connected_nodes: int
    cordoned_nodes: frozenset[str]
    recent_plans_by_target: Mapping[str, int]
    """Accepted plans touching each target key within `rate_window_s`."""
    rate_window_s: float
    source: Mapping[str, Any] = field(default_factory=dict)
    """The calibration of the plan's source (`source` in rules; docs/safe-autonomy.md); keys
    missing here take the values of a source with no history."""
    breaker: Mapping[str, Any] = field(default_factory=dict)
    """The autonomy breaker (`breaker` in rules): tripped, reason; empty: not tripped."""
