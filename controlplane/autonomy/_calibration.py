"""Planner calibration: for each plan source, how its recently ended plans went (rollbacks) and
how often its predictions came true against the confidence it stated, over a sliding window.

Kept in memory and refreshed from the store in the background (only plans changed since the
last refresh are read, through the index on `plans.updated_at`), and at once on every local
change of a terminal plan: policies read it on the submission path without a query."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from controlplane.plans import TERMINAL, Phase, Plan, PredictionVerdict
from controlplane.store import PLANS, Store

PLANNER_ROLE = "planner"
# A refresh re-reads plans changed this long before the newest change it saw: replicas' clocks
# differ a little, and a transaction may commit after a later one.
_SLACK = dt.timedelta(seconds=30)
_TERMINAL_PHASES = sorted(phase.value for phase in TERMINAL)
_EXECUTED = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.ROLLED_BACK})
_READ_CHUNK = 500


def role_of(spiffe_id: str) -> str:
    """The role of a SPIFFE id: its first path segment (spiffe://domain/<role>/<name>)."""
    rest = spiffe_id.removeprefix("spiffe://")
    parts = rest.split("/")
    return parts[1] if len(parts) > 2 else ""


def is_planner_plan(plan: Plan) -> bool:
    """Plans a planner submitted (the ones the breaker holds); an operator's never are."""
    return role_of(plan.submitted_by) == PLANNER_ROLE


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    """How one plan that ran ended, as calibration and the breaker count it."""

    plan_id: str
    version: int
    source: str
    planner: bool
    ended_at: dt.datetime
    rolled_back: bool
    """ROLLED_BACK, or FAILED after one of its steps ran on a target."""
    judged: int
    held: int
    confidence_sum: float
    """Sum of the stated confidences of the judged predictions."""


def _outcome(
    plan_id: str,
    version: int,
    source: str,
    submitted_by: str,
    phase: Phase,
    ended_at: dt.datetime,
    body: Mapping[str, Any],
) -> PlanOutcome | None:
    if phase not in _EXECUTED:
        return None  # rejected or cancelled before it ran: no evidence either way
    ran = any(step.get("node_results") for step in body.get("steps", ()))
    judged = held = 0
    confidence = 0.0
    for result in body.get("prediction_results", ()):
        verdict = result.get("verdict")
        if verdict == PredictionVerdict.INCONCLUSIVE or verdict is None:
            continue
        judged += 1
        held += verdict == PredictionVerdict.HELD
        confidence += float(result.get("confidence") or 0.0)
    return PlanOutcome(
        plan_id=plan_id,
        version=version,
        source=source,
        planner=role_of(submitted_by) == PLANNER_ROLE,
        ended_at=ended_at,
        rolled_back=phase == Phase.ROLLED_BACK or (phase == Phase.FAILED and ran),
        judged=judged,
        held=held,
        confidence_sum=confidence,
    )


def outcome_of(plan: Plan) -> PlanOutcome | None:
    """The outcome of a terminal plan as the repository just saved it; None when it never ran."""
    if not plan.phase.terminal:
        return None
    body = {
        "steps": [{"node_results": step.node_results} for step in plan.steps],
        "prediction_results": [
            {"verdict": r.verdict.value, "confidence": r.confidence}
            for r in plan.prediction_results
        ],
    }
    ended = plan.updated_at or dt.datetime.now(dt.UTC)
    return _outcome(
        plan.plan_id, plan.version, plan.source, plan.submitted_by, plan.phase, ended, body
    )


@dataclass(frozen=True, slots=True)
class Calibration:
    """One source's record over the window."""

    source: str
    plans: int
    rollbacks: int
    predictions: int
    predictions_held: int
    confidence_sum: float
    window_s: float

    @property
    def hit_rate(self) -> float:
        """Held / judged; 1 when nothing was judged (no evidence against the source)."""
        return self.predictions_held / self.predictions if self.predictions else 1.0

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.predictions if self.predictions else 0.0

    def variables(self) -> dict[str, Any]:
        """The `source` variable of policies."""
        return {
            "name": self.source,
            "prediction_hit_rate": self.hit_rate,
            "predictions": self.predictions,
            "predictions_held": self.predictions_held,
            "recent_rollbacks": self.rollbacks,
            "plans": self.plans,
            "mean_confidence": self.mean_confidence,
        }


@dataclass(slots=True)
class _Totals:
    plans: int = 0
    rollbacks: int = 0
    judged: int = 0
    held: int = 0
    confidence_sum: float = 0.0

    def add(self, o: PlanOutcome, sign: int) -> None:
        self.plans += sign
        self.rollbacks += sign * o.rolled_back
        self.judged += sign * o.judged
        self.held += sign * o.held
        self.confidence_sum += sign * o.confidence_sum


class CalibrationCache:
    """The outcomes of plans that ended within the window (the longest of the calibration
    window and the breaker's), in memory, with running totals per source over the calibration
    window (a change costs O(1); reads cost nothing)."""

    def __init__(self, store: Store, *, window_s: float, keep_s: float | None = None) -> None:
        self._store = store
        self.window_s = window_s
        self._window = dt.timedelta(seconds=window_s)
        self._keep = dt.timedelta(seconds=max(window_s, keep_s or 0.0))
        self._outcomes: dict[str, PlanOutcome] = {}
        self._counted: dict[str, PlanOutcome] = {}
        """The outcomes within the calibration window, as the totals count them."""
        self._totals: dict[str, _Totals] = {}
        self._watermark: dt.datetime | None = None

    # --- reads (memory only) ----------------------------------------------------------------

    def of(self, source: str) -> Calibration:
        """The source's calibration; an empty record when it has no plan in the window."""
        t = self._totals.get(source) or _Totals()
        return Calibration(
            source, t.plans, t.rollbacks, t.judged, t.held, t.confidence_sum, self.window_s
        )

    def all(self) -> list[Calibration]:
        """Every source with a plan in the window, by name."""
        return [self.of(source) for source in sorted(self._totals)]

    def planner_rollbacks_since(self, since: dt.datetime) -> list[PlanOutcome]:
        """Planner plans that rolled back (or failed after a step ran) at or after `since`."""
        return [
            o
            for o in self._outcomes.values()
            if o.planner and o.rolled_back and o.ended_at >= since
        ]

    # --- updates ----------------------------------------------------------------------------

    def note(self, plan: Plan) -> PlanOutcome | None:
        """A plan changed on this replica: a terminal one counts at once (returned)."""
        outcome = outcome_of(plan)
        if outcome is None:
            return None
        known = self._outcomes.get(outcome.plan_id)
        if known is not None and known.version >= outcome.version:
            return None
        if known is not None:  # a later save (its predictions judged, say): same end time
            outcome = _with_end(outcome, known.ended_at)
        self._put(outcome, dt.datetime.now(dt.UTC))
        return outcome

    async def refresh(self, now: dt.datetime | None = None) -> None:
        """Reads the plans that turned (or changed while) terminal since the last refresh."""
        now = now or dt.datetime.now(dt.UTC)
        oldest = now - self._keep
        since = oldest if self._watermark is None else max(oldest, self._watermark - _SLACK)
        known = {plan_id: o.version for plan_id, o in self._outcomes.items()}
        rows, newest = await self._store.run_core(lambda db: _read_changed(db, since, known))
        for row in rows:
            previous = self._outcomes.get(row.plan_id)
            outcome = _outcome(
                row.plan_id,
                row.version,
                row.source,
                row.submitted_by,
                Phase(row.phase),
                previous.ended_at if previous is not None else row.updated_at,
                row.body or {},
            )
            if outcome is not None:
                self._put(outcome, now)
        self._watermark = max(newest or since, self._watermark or since)
        self._expire(now)

    def _put(self, outcome: PlanOutcome, now: dt.datetime) -> None:
        self._uncount(outcome.plan_id)
        self._outcomes[outcome.plan_id] = outcome
        if outcome.ended_at >= now - self._window:
            self._counted[outcome.plan_id] = outcome
            self._totals.setdefault(outcome.source, _Totals()).add(outcome, 1)

    def _uncount(self, plan_id: str) -> None:
        counted = self._counted.pop(plan_id, None)
        if counted is None:
            return
        totals = self._totals[counted.source]
        totals.add(counted, -1)
        if totals.plans <= 0:
            del self._totals[counted.source]

    def _expire(self, now: dt.datetime) -> None:
        since = now - self._window
        for plan_id in [p for p, o in self._counted.items() if o.ended_at < since]:
            self._uncount(plan_id)
        oldest = now - self._keep
        for plan_id in [p for p, o in self._outcomes.items() if o.ended_at < oldest]:
            del self._outcomes[plan_id]


def _with_end(outcome: PlanOutcome, ended_at: dt.datetime) -> PlanOutcome:
    return PlanOutcome(
        outcome.plan_id,
        outcome.version,
        outcome.source,
        outcome.planner,
        ended_at,
        outcome.rolled_back,
        outcome.judged,
        outcome.held,
        outcome.confidence_sum,
    )


def _read_changed(
    db: Connection, since: dt.datetime, known: Mapping[str, int]
) -> tuple[Sequence[Any], dt.datetime | None]:
    """Terminal plans changed since `since` that memory does not hold at their version (the
    ids and versions first, cheap; then the bodies of the new ones only), and the newest
    change seen."""
    heads = db.execute(
        select(PLANS.c.plan_id, PLANS.c.version, PLANS.c.updated_at).where(
            PLANS.c.updated_at >= since, PLANS.c.phase.in_(_TERMINAL_PHASES)
        )
    ).all()
    newest = max((updated for _, _, updated in heads), default=None)
    wanted = [plan_id for plan_id, version, _ in heads if known.get(plan_id, 0) < version]
    rows: list[Any] = []
    for chunk in _chunks(wanted, _READ_CHUNK):
        rows.extend(
            db.execute(
                select(
                    PLANS.c.plan_id,
                    PLANS.c.version,
                    PLANS.c.source,
                    PLANS.c.submitted_by,
                    PLANS.c.phase,
                    PLANS.c.updated_at,
                    PLANS.c.body,
                ).where(PLANS.c.plan_id.in_(chunk))
            ).all()
        )
    return rows, newest


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]
