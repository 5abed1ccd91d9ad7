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
    # Back to AWAITING_APPROVAL: the autonomy breaker tripped before a planner's plan started.
    Phase.APPROVED: frozenset({Phase.EXECUTING, Phase.CANCELLED, Phase.AWAITING_APPROVAL}),
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


@dataclass(frozen=True, slots=True)
class Precondition:
    """A CEL condition on a target's current state (`target`, `state`, `sample`) that must hold
    at validation, at approval and right before each step."""

    name: str
    expression: str


@dataclass(frozen=True, slots=True)
class TargetState:
    """The fields of one target that the plan's actions change, as observed at `observed_at`
    (ISO 8601): field name to value as text."""

    target: str
    fields: dict[str, str]
    observed_at: str


class Aggregation(enum.StrEnum):
    """How a prediction's metric is folded over the targets' values."""

    MEAN = "MEAN"
    MIN = "MIN"
    MAX = "MAX"
    P95 = "P95"


class MissAction(enum.StrEnum):
    """What a missed prediction does to the plan."""

    ROLLBACK = "ROLLBACK"
    RECORD = "RECORD"


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the plan should achieve: `expression` (CEL over `value`, the aggregated `metric`,
    and `samples`) must come true within `window_s` of the last step."""

    name: str
    metric: str
    aggregation: Aggregation
    expression: str
    window_s: float = 60.0
    on_miss: MissAction = MissAction.ROLLBACK
    confidence: float = 0.0
    """The planner's confidence in it; 0 means the plan's."""


class PredictionVerdict(enum.StrEnum):
    HELD = "HELD"
    MISSED = "MISSED"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True, slots=True)
class PredictionResult:
    """A prediction's verdict with what was measured (JSON-safe: times as ISO 8601 text)."""

    name: str
    verdict: PredictionVerdict
    observed: float | None
    message: str
    time_to_effect_s: float | None
    checked_at: str
    samples: int
    confidence: float


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """One metric over a window: mean, p95, min, max of `count` values (samples times GPUs);
    window bounds as ISO 8601 text."""

    mean: float
    p95: float
    min: float
    max: float
    count: int
    start: str
    end: str


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
    # Safe autonomy (docs/safe-autonomy.md).
    preconditions: tuple[Precondition, ...] = ()
    allow_drift: tuple[str, ...] = ()
    recorded_state: dict[str, TargetState] = field(default_factory=dict)
    """Target key to its state as recorded at validation (again at approval, and after each of
    the plan's own changes to it)."""
    predictions: tuple[Prediction, ...] = ()
    prediction_results: list[PredictionResult] = field(default_factory=list)
    waiting_reason: str = ""
    """Why the plan waits (a disruption budget, the autonomy breaker); empty when it does not."""
    telemetry_before: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)
    """Target key to metric to its summary over a window before the first step."""
    telemetry_after: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)
    """Target key to metric to its summary over a window after the last step."""
    steps_finished_at: dt.datetime | None = None
    """When the last step ended (predictions' time to effect counts from here)."""

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
            recorded_state=dict(self.recorded_state),
            prediction_results=list(self.prediction_results),
            telemetry_before=dict(self.telemetry_before),
            telemetry_after=dict(self.telemetry_after),
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
        "preconditions": [dataclasses.asdict(p) for p in plan.preconditions],
        "allow_drift": list(plan.allow_drift),
        "predictions": [
            {
                "name": p.name,
                "metric": p.metric,
                "aggregation": p.aggregation.value,
                "expression": p.expression,
                "window_seconds": p.window_s,
                "on_miss": p.on_miss.value,
                "confidence": p.confidence,
            }
            for p in plan.predictions
        ],
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
        "preconditions": [dataclasses.asdict(p) for p in plan.preconditions],
        "allow_drift": list(plan.allow_drift),
        "recorded_state": {k: dataclasses.asdict(v) for k, v in plan.recorded_state.items()},
        "predictions": [dataclasses.asdict(p) for p in plan.predictions],
        "prediction_results": [dataclasses.asdict(r) for r in plan.prediction_results],
        "waiting_reason": plan.waiting_reason,
        "telemetry_before": _summaries_body(plan.telemetry_before),
        "telemetry_after": _summaries_body(plan.telemetry_after),
        "steps_finished_at": (
            plan.steps_finished_at.isoformat() if plan.steps_finished_at else None
        ),
    }


def _summaries_body(
    summaries: dict[str, dict[str, MetricSummary]],
) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        target: {metric: dataclasses.asdict(s) for metric, s in metrics.items()}
        for target, metrics in summaries.items()
    }


def _summaries_from(data: dict[str, Any] | None) -> dict[str, dict[str, MetricSummary]]:
    return {
        target: {metric: MetricSummary(**s) for metric, s in metrics.items()}
        for target, metrics in (data or {}).items()
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
    plan.preconditions = tuple(Precondition(**p) for p in body.get("preconditions", ()))
    plan.allow_drift = tuple(body.get("allow_drift", ()))
    plan.recorded_state = {
        k: TargetState(**v) for k, v in (body.get("recorded_state") or {}).items()
    }
    plan.predictions = tuple(
        Prediction(
            **{
                **p,
                "aggregation": Aggregation(p["aggregation"]),
                "on_miss": MissAction(p["on_miss"]),
            }
        )
        for p in body.get("predictions", ())
    )
    plan.prediction_results = [
        PredictionResult(**{**r, "verdict": PredictionVerdict(r["verdict"])})
        for r in body.get("prediction_results", ())
    ]
    plan.waiting_reason = body.get("waiting_reason", "")
    plan.telemetry_before = _summaries_from(body.get("telemetry_before"))
    plan.telemetry_after = _summaries_from(body.get("telemetry_after"))
    finished = body.get("steps_finished_at")
    plan.steps_finished_at = dt.datetime.fromisoformat(finished) if finished else None


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
