"""Action plans as the domain sees them: phases and their allowed transitions, steps with
their per-node results, and the plan document the policy engine evaluates."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import random
import time
from dataclasses import dataclass, field
from typing import Any

from controlplane.analysis import PrometheusGate
from controlplane.executors import Target


class Phase(enum.StrEnum):
    """The phase of a plan in its state machine."""

    PENDING = "PENDING"
    VALIDATING = "VALIDATING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELLED = "CANCELLED"
    PAUSED = "PAUSED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {Phase.REJECTED, Phase.COMPLETED, Phase.FAILED, Phase.ROLLED_BACK, Phase.CANCELLED}
)

# The state machine of docs/plans.md, and nothing else: a transition not listed here is a bug.
ALLOWED_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.VALIDATING}),
    Phase.VALIDATING: frozenset({Phase.APPROVED, Phase.REJECTED, Phase.AWAITING_APPROVAL}),
    Phase.AWAITING_APPROVAL: frozenset({Phase.APPROVED, Phase.CANCELLED}),
    Phase.APPROVED: frozenset({Phase.EXECUTING, Phase.CANCELLED}),
    Phase.EXECUTING: frozenset({Phase.COMPLETED, Phase.FAILED, Phase.ROLLING_BACK, Phase.PAUSED}),
    # An operator's approve resumes it; a cancel or the pause's timeout resume it too, and
    # the controller then rolls it back from EXECUTING.
    Phase.PAUSED: frozenset({Phase.EXECUTING}),
    Phase.ROLLING_BACK: frozenset({Phase.ROLLED_BACK, Phase.FAILED}),
}


class IllegalTransition(Exception):
    """A phase change the state machine does not allow (from a terminal phase, say)."""


def check_transition(current: Phase, target: Phase) -> None:
    if target not in ALLOWED_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a plan in phase {current} cannot move to {target}")


class StepState(enum.StrEnum):
    """The state of one step, or of one step on one target."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


@dataclass(slots=True)
class NodeResult:
    """What one target did for one step; rollback fields are set when its change was undone."""

    node_id: str
    """The node's id, or for a target that is not a node its key (`Target.result_key`)."""
    state: StepState = StepState.PENDING
    command_id: str = ""
    outcome: str = ""
    message: str = ""
    output: dict[str, Any] = field(default_factory=dict)
    rollback_command_id: str = ""
    rollback_outcome: str = ""


@dataclass(slots=True)
class Step:
    """One step of a plan: an action with its parameters on one or more targets, and its results."""

    index: int
    step_id: str
    action: str
    targets: tuple[Target, ...]
    parameters: dict[str, Any]
    timeout_s: float
    state: StepState = StepState.PENDING
    message: str = ""
    node_results: list[NodeResult] = field(default_factory=list)

    @property
    def node_ids(self) -> list[str]:
        return [t.node_id for t in self.targets if t.node_id]

    def result_for(self, node_id: str) -> NodeResult | None:
        for result in self.node_results:
            if result.node_id == node_id:
                return result
        return None


@dataclass(frozen=True, slots=True)
class AnalysisRecord:
    """One analysis measurement as the plan keeps it: JSON-safe (NaN and infinities as text)."""

    gate: str
    step_index: int
    target: str
    point: str
    query: str
    value: Any
    condition: str
    verdict: str
    message: str
    started_at: str
    finished_at: str


@dataclass(frozen=True, slots=True)
class HealthGate:
    """A check after each wave and at each stage of a progressive rollout: a CEL condition on
    the touched nodes' fresh telemetry, or (with `prometheus`) a Prometheus query gate."""

    name: str
    expression: str
    window_s: float
    prometheus: PrometheusGate | None = None
    pause_on_inconclusive: bool = False
    """An inconclusive Prometheus gate pauses the plan for an operator instead of failing."""
    pause_timeout_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of the fleet a plan may change at once, and by when it must finish."""

    max_nodes_in_parallel: int = 1
    max_replicas_in_parallel: int = 0
    deadline_s: float = 0.0  # 0: no deadline beyond each step's timeout


@dataclass(frozen=True, slots=True)
class Transition:
    """One phase change of a plan: when, by whom and why."""

    from_phase: Phase
    to_phase: Phase
    at: dt.datetime
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class Violation:
    """A policy rule a plan broke, with its effect and the field it concerns."""

    rule_id: str
    message: str
    field: str
    effect: str = "REJECT"


@dataclass(slots=True)
class Plan:
    """An action plan: what was asked, the verdict on it, and how far its execution got."""

    plan_id: str
    request_id: str
    source: str
    rationale: str
    confidence: float
    expire_at: dt.datetime | None
    steps: list[Step]
    health_gates: tuple[HealthGate, ...]
    limits: Limits
    submitted_by: str = ""
    phase: Phase = Phase.PENDING
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    violations: tuple[Violation, ...] = ()
    transitions: tuple[Transition, ...] = ()
    status_message: str = ""
    version: int = 0
    # Execution bookkeeping, stored with the steps.
    cancel_requested: str = ""  # who asked and why, while EXECUTING
    started_at: dt.datetime | None = None
    measurements: list[AnalysisRecord] = field(default_factory=list)
    paused_until: dt.datetime | None = None
    trace_context: dict[str, str] = field(default_factory=dict)
    """The W3C trace context (`traceparent`, `tracestate`) of the submission, kept with the
    plan so that its execution, later and on any replica, continues the submission's trace;
    empty when the submission was not traced."""

    @property
    def node_ids(self) -> list[str]:
        """Distinct nodes over all steps, in first-touched order."""
        seen: dict[str, None] = {}
        for step in self.steps:
            for node_id in step.node_ids:
                seen.setdefault(node_id, None)
        return list(seen)

    @property
    def target_keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for step in self.steps:
            for target in step.targets:
                seen.setdefault(target.key, None)
        return list(seen)

    def copy(self) -> Plan:
        return dataclasses.replace(
            self,
            measurements=list(self.measurements),
            steps=[
                dataclasses.replace(
                    s, node_results=[dataclasses.replace(r) for r in s.node_results]
                )
                for s in self.steps
            ],
        )


def new_plan_id() -> str:
    # Time-ordered, so ids sort in submission order (ListPlans pages by id). Ids are names,
    # not secrets: the random part only keeps ids made in the same nanosecond apart.
    return f"plan-{time.time_ns():x}-{random.getrandbits(40):010x}"


def plan_document(plan: Plan) -> dict[str, Any]:
    """The plan as plain data, the shape policy rules (CEL) are written against."""
    return {
        "plan_id": plan.plan_id,
        "request_id": plan.request_id,
        "source": plan.source,
        "rationale": plan.rationale,
        "confidence": plan.confidence,
        "submitted_by": plan.submitted_by,
        "expire_time": plan.expire_at,
        "steps": [
            {
                "index": step.index,
                "step_id": step.step_id,
                "action": step.action,
                "targets": [t.document() for t in step.targets],
                "node_ids": step.node_ids,
                "parameters": step.parameters,
                "timeout_seconds": step.timeout_s,
            }
            for step in plan.steps
        ],
        "health_gates": [
            {
                "name": g.name,
                "expression": g.expression,
                "window_seconds": g.window_s,
                "prometheus": dataclasses.asdict(g.prometheus) if g.prometheus else None,
                "pause_on_inconclusive": g.pause_on_inconclusive,
                "pause_timeout_seconds": g.pause_timeout_s,
            }
            for g in plan.health_gates
        ],
        "limits": {
            "max_nodes_in_parallel": plan.limits.max_nodes_in_parallel,
            "max_replicas_in_parallel": plan.limits.max_replicas_in_parallel,
            "deadline_seconds": plan.limits.deadline_s,
        },
        "node_ids": plan.node_ids,
        "targets": plan.target_keys,
    }


# --- storage form of the mutable parts (steps, gates, limits) --------------------------------


def body_of(plan: Plan) -> dict[str, Any]:
    """The JSON stored in plans.body: steps with their state, gates, limits, bookkeeping."""
    return {
        "steps": [
            {
                "step_id": s.step_id,
                "action": s.action,
                "targets": [t.document() for t in s.targets],
                "parameters": s.parameters,
                "timeout_s": s.timeout_s,
                "state": s.state.value,
                "message": s.message,
                "node_results": [dataclasses.asdict(r) for r in s.node_results],
            }
            for s in plan.steps
        ],
        "health_gates": [dataclasses.asdict(g) for g in plan.health_gates],
        "limits": dataclasses.asdict(plan.limits),
        "cancel_requested": plan.cancel_requested,
        "started_at": plan.started_at.isoformat() if plan.started_at else None,
        "measurements": [dataclasses.asdict(m) for m in plan.measurements],
        "paused_until": plan.paused_until.isoformat() if plan.paused_until else None,
        "trace_context": plan.trace_context,
    }


def apply_body(plan: Plan, body: dict[str, Any]) -> None:
    """Fills the mutable parts of `plan` from a stored body (inverse of `body_of`)."""
    plan.steps = [
        Step(
            index=i,
            step_id=s["step_id"],
            action=s["action"],
            targets=tuple(Target.from_document(t) for t in s["targets"]),
            parameters=s["parameters"],
            timeout_s=s["timeout_s"],
            state=StepState(s["state"]),
            message=s["message"],
            node_results=[
                NodeResult(**{**r, "state": StepState(r["state"])}) for r in s["node_results"]
            ],
        )
        for i, s in enumerate(body["steps"])
    ]
    plan.health_gates = tuple(_gate_from(g) for g in body["health_gates"])
    plan.limits = Limits(**body["limits"])
    plan.cancel_requested = body.get("cancel_requested", "")
    started = body.get("started_at")
    plan.started_at = dt.datetime.fromisoformat(started) if started else None
    plan.measurements = [AnalysisRecord(**m) for m in body.get("measurements", [])]
    paused_until = body.get("paused_until")
    plan.paused_until = dt.datetime.fromisoformat(paused_until) if paused_until else None
    plan.trace_context = dict(body.get("trace_context") or {})


def _gate_from(data: dict[str, Any]) -> HealthGate:
    prometheus = data.get("prometheus")
    return HealthGate(
        data["name"],
        data["expression"],
        data["window_s"],
        PrometheusGate(**prometheus) if prometheus else None,
        data.get("pause_on_inconclusive", False),
        data.get("pause_timeout_s", 3600.0),
    )
