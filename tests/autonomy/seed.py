"""Finished plans written straight into the store, with the outcome and prediction verdicts a
test needs (what the controller and the prediction checker would have left)."""

from __future__ import annotations

import datetime as dt
import uuid

from controlplane.executors import Target
from controlplane.plans import (
    Limits,
    NodeResult,
    Phase,
    Plan,
    PlanRepository,
    PredictionResult,
    PredictionVerdict,
    Step,
    StepState,
    Transition,
)
from controlplane.plans._repository import Decision  # the insert path of submissions

PLANNER = "spiffe://sentinel.local/planner/inframind"
OPERATOR = "spiffe://sentinel.local/operator/alice"

_PATH = {
    Phase.COMPLETED: (Phase.APPROVED, Phase.EXECUTING, Phase.COMPLETED),
    Phase.ROLLED_BACK: (Phase.APPROVED, Phase.EXECUTING, Phase.ROLLING_BACK, Phase.ROLLED_BACK),
    Phase.FAILED: (Phase.APPROVED, Phase.EXECUTING, Phase.FAILED),
    Phase.APPROVED: (Phase.APPROVED,),
    Phase.CANCELLED: (Phase.AWAITING_APPROVAL, Phase.CANCELLED),
}


def verdicts(
    held: int, missed: int = 0, inconclusive: int = 0, confidence: float = 0.9
) -> list[PredictionResult]:
    """Prediction results: `held` HELD, `missed` MISSED, `inconclusive` INCONCLUSIVE."""
    results = []
    for verdict, count in (
        (PredictionVerdict.HELD, held),
        (PredictionVerdict.MISSED, missed),
        (PredictionVerdict.INCONCLUSIVE, inconclusive),
    ):
        for i in range(count):
            results.append(
                PredictionResult(
                    name=f"{verdict.value.lower()}-{i}",
                    verdict=verdict,
                    observed=1.0,
                    message="seeded",
                    time_to_effect_s=1.0,
                    checked_at=dt.datetime.now(dt.UTC).isoformat(),
                    samples=3,
                    confidence=confidence,
                )
            )
    return results


async def seed_plan(
    repository: PlanRepository,
    phase: Phase,
    *,
    source: str = "inframind",
    submitted_by: str = PLANNER,
    predictions: list[PredictionResult] | None = None,
    ran: bool = True,
) -> Plan:
    """A plan stored in `phase` (terminal, or APPROVED), through the submission's insert; a
    terminal one's step ran on node-z unless `ran` is false."""
    now = dt.datetime.now(dt.UTC)
    result = NodeResult("node-z", StepState.SUCCEEDED, "cmd-1", "SUCCEEDED")
    step = Step(
        index=0,
        step_id="s0",
        action="cordon",
        targets=(Target("node-z"),),
        parameters={},
        timeout_s=10.0,
        state=StepState.SUCCEEDED if ran and phase.terminal else StepState.PENDING,
        node_results=[result] if ran and phase.terminal else [],
    )
    plan = Plan(
        plan_id=f"plan-seed-{uuid.uuid4().hex[:12]}",
        request_id=uuid.uuid4().hex,
        source=source,
        rationale="seeded",
        confidence=0.9,
        expire_at=None,
        steps=[step],
        health_gates=(),
        limits=Limits(),
        submitted_by=submitted_by,
        phase=phase,
        created_at=now,
        prediction_results=list(predictions or []),
    )
    previous = Phase.VALIDATING
    transitions = [Transition(Phase.PENDING, Phase.VALIDATING, now, submitted_by, "submitted")]
    for to in _PATH[phase]:
        transitions.append(Transition(previous, to, now, "pipeline-controller", "seeded"))
        previous = to
    decision = Decision(plan, "seeded", tuple(transitions), store=True)
    await repository.submit_new(plan, now, lambda _recent: decision)
    return plan
