"""Plans in the store: creation with their first transitions, reads, and fenced updates.

Every write bumps the plan's `version` and is conditional on the version it read (optimistic
concurrency between the API and the controller, and between control planes); writes by the
controller also carry its lease epoch, so a deposed leader cannot change anything.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from controlplane.audit import audit_row
from controlplane.plans._lease import Fence
from controlplane.plans._model import (
    Phase,
    Plan,
    Transition,
    Violation,
    apply_body,
    body_of,
    check_transition,
)
from controlplane.store import (
    AUDIT_EVENTS,
    PLAN_TARGETS,
    PLAN_TRANSITIONS,
    PLANS,
    Bus,
    Store,
    UtcDateTime,
    fit,
)

TRANSITION_METHOD = "plan.transition"
# Statements of the submission path, built once: composing them per call cost more CPU than
# the database spent running them.
_INSERT_PLAN = insert(PLANS)
_INSERT_TARGETS = insert(PLAN_TARGETS)
_INSERT_TRANSITIONS = insert(PLAN_TRANSITIONS)
_INSERT_AUDIT = insert(AUDIT_EVENTS)
_PLAN_BY_REQUEST_ID = select(PLANS.c.plan_id).where(PLANS.c.request_id == bindparam("request_id"))

# history.recent counts stop here: "this many or more" (see request_lookup).
RATE_HISTORY_CAP = 100


class PlanNotFound(LookupError):
    """No plan has that id."""

    pass


class PlanConflict(Exception):
    """The plan changed since it was read (another writer won); re-read and decide again."""


class RequestIdConflict(Exception):
    """The request_id was already used, by the plan in `plan_id` (read it for a replay)."""

    def __init__(self, plan_id: str) -> None:
        super().__init__(plan_id)
        self.plan_id = plan_id


@dataclass(frozen=True, slots=True)
class PlanFilter:
    """Which plans a listing returns."""

    phase: Phase | None = None
    source: str = ""
    target: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """What a submission decided inside its transaction: the plan in its verdict's phase, the
    transitions that led there, and whether to store it (not for validate_only)."""

    plan: Plan
    digest: str
    transitions: tuple[Transition, ...]
    store: bool


@dataclass(frozen=True, slots=True)
class PlanChange:
    """What happened to a plan, for watchers and metrics."""

    plan: Plan
    transitions: tuple[Transition, ...]


@functools.lru_cache(maxsize=64)
def _recent_counts_query(targets: int) -> TextClause:
    """One statement with one capped count per target (built once per number of targets:
    composing it with the expression language cost ~2 ms per submission). Capped because a
    rate-limit rule only asks whether a small threshold is reached, while an uncapped count
    grows with the history of a busy target."""
    rejected = ", ".join(f"'{p.value}'" for p in (Phase.REJECTED, Phase.CANCELLED))
    # Only integers and the phases' own constants are formatted in; every value is bound.
    columns = ", ".join(
        f"(SELECT count(*) FROM (SELECT 1 FROM plan_targets pt JOIN plans p "  # noqa: S608
        f"ON p.plan_id = pt.plan_id WHERE pt.target = :t{i} AND pt.created_at >= :since "
        f"AND p.phase NOT IN ({rejected}) LIMIT {RATE_HISTORY_CAP}) AS s{i}) AS c{i}"
        for i in range(targets)
    )
    return text(f"SELECT {columns}").bindparams(bindparam("since", type_=UtcDateTime()))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _plan_from_row(row: Any) -> Plan:
    plan = Plan(
        plan_id=row.plan_id,
        request_id=row.request_id,
        source=row.source,
        rationale=row.rationale,
        confidence=row.confidence,
        expire_at=row.expire_at,
        steps=[],
        health_gates=(),
        limits=None,  # type: ignore[arg-type]  # filled by apply_body
        submitted_by=row.submitted_by,
        phase=Phase(row.phase),
        created_at=row.created_at,
        updated_at=row.updated_at,
        violations=tuple(Violation(**v) for v in row.violations),
        status_message=row.status_message,
        version=row.version,
    )
    apply_body(plan, row.body)
    return plan


def _transition_rows(
    plan_id: str, transitions: Sequence[Transition]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [
        {
            "plan_id": plan_id,
            "from_phase": t.from_phase.value,
            "to_phase": t.to_phase.value,
            "at": t.at,
            "actor": t.actor,
            "reason": fit(t.reason),
        }
        for t in transitions
    ]
    audits = [
        audit_row(
            t.actor,
            TRANSITION_METHOD,
            f"plan/{plan_id}",
            t.to_phase.value,
            f"{t.from_phase.value} → {t.to_phase.value}: {t.reason}",
            at=t.at,
        )
        for t in transitions
    ]
    return rows, audits


PLAN_CHANNEL = "sentinel_plan"
"""Bus channel announcing a change of a plan (payload: its id) to the other replicas."""


class PlanRepository:
    """Stores plans with their transitions and targets; writes are fenced and optimistic."""

    def __init__(
        self, store: Store, on_change: Callable[[PlanChange], None], bus: Bus | None = None
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._bus = bus

    # --- reads ------------------------------------------------------------------------------

    @staticmethod
    def _read(db: Connection, plan_id: str, with_transitions: bool = True) -> Plan | None:
        row = db.execute(select(PLANS).where(PLANS.c.plan_id == plan_id)).first()
        if row is None:
            return None
        plan = _plan_from_row(row)
        if with_transitions:
            plan.transitions = PlanRepository._transitions(db, plan_id)
        return plan

    @staticmethod
    def _transitions(db: Connection, plan_id: str, after_id: int = 0) -> tuple[Transition, ...]:
        rows = db.execute(
            select(PLAN_TRANSITIONS)
            .where(PLAN_TRANSITIONS.c.plan_id == plan_id, PLAN_TRANSITIONS.c.id > after_id)
            .order_by(PLAN_TRANSITIONS.c.id)
        )
        return tuple(
            Transition(Phase(r.from_phase), Phase(r.to_phase), r.at, r.actor, r.reason)
            for r in rows
        )

    async def get(self, plan_id: str) -> Plan:
        plan = await self._store.run_core(lambda db: self._read(db, plan_id))
        if plan is None:
            raise PlanNotFound(plan_id)
        return plan

    async def find_by_request_id(self, request_id: str) -> Plan | None:
        def read(db: Connection) -> Plan | None:
            plan_id = db.scalar(select(PLANS.c.plan_id).where(PLANS.c.request_id == request_id))
            return None if plan_id is None else self._read(db, plan_id)

        return await self._store.run_core(read)

    @staticmethod
    def _recent_counts(
        db: Connection, targets: Sequence[str], since: dt.datetime
    ) -> dict[str, int]:
        """For each target, how many accepted plans touched it since `since` (capped)."""
        if not targets:
            return {}
        params: dict[str, Any] = {f"t{i}": t for i, t in enumerate(targets)}
        values = db.execute(_recent_counts_query(len(targets)), {**params, "since": since}).one()
        return {t: int(n) for t, n in zip(targets, values, strict=True) if n}

    async def submit_new(
        self,
        plan: Plan,
        since: dt.datetime,
        decide: Callable[[dict[str, int]], Decision],
    ) -> Plan | Decision:
        """Submission in ONE transaction: the plan already stored under its request_id (a
        replay: returned as is); otherwise `decide` (the policy verdict, given the per-target
        counts of plans since `since`) and, unless it says not to store, the plan with its
        targets, transitions and their audit events. Raises `RequestIdConflict` when another
        submission with the same request_id committed first."""

        def work(db: Connection) -> Plan | Decision:
            plan_id = db.scalar(_PLAN_BY_REQUEST_ID, {"request_id": plan.request_id})
            if plan_id is not None:
                existing = self._read(db, plan_id)
                if existing is not None:
                    return existing
            decision = decide(self._recent_counts(db, plan.target_keys, since))
            if decision.store:
                self._insert(db, decision.plan, decision.digest, decision.transitions)
                if self._bus is not None:
                    self._bus.notify(db, PLAN_CHANNEL, decision.plan.plan_id)
            return decision

        try:
            outcome = await self._store.run_core(work)
        except IntegrityError:
            existing = await self.find_by_request_id(plan.request_id)
            if existing is None:
                raise
            raise RequestIdConflict(existing.plan_id) from None
        if isinstance(outcome, Decision) and outcome.store:
            stored = outcome.plan
            stored.version = 1
            stored.updated_at = stored.created_at
            stored.transitions = tuple(outcome.transitions)
            self._on_change(PlanChange(stored, stored.transitions))
        return outcome

    async def query(self, where: PlanFilter, after_id: str, limit: int) -> list[Plan]:
        def read(db: Connection) -> list[Plan]:
            query = select(PLANS).where(PLANS.c.plan_id > after_id)
            if where.phase is not None:
                query = query.where(PLANS.c.phase == where.phase.value)
            if where.source:
                query = query.where(PLANS.c.source == where.source)
            if where.target:
                query = query.where(
                    PLANS.c.plan_id.in_(
                        select(PLAN_TARGETS.c.plan_id).where(PLAN_TARGETS.c.target == where.target)
                    )
                )
            rows = db.execute(query.order_by(PLANS.c.plan_id).limit(limit)).all()
            plans = [_plan_from_row(row) for row in rows]
            for plan in plans:
                plan.transitions = self._transitions(db, plan.plan_id)
            return plans

        return await self._store.run_core(read)

    async def active_plan_ids(self) -> list[str]:
        """Plans the controller has work on, oldest first."""
        active = [
            Phase.APPROVED.value,
            Phase.EXECUTING.value,
            Phase.PAUSED.value,
            Phase.ROLLING_BACK.value,
        ]

        def read(db: Connection) -> list[str]:
            return list(
                db.scalars(
                    select(PLANS.c.plan_id)
                    .where(PLANS.c.phase.in_(active))
                    .order_by(PLANS.c.plan_id)
                )
            )

        return await self._store.run_core(read)

    async def expiring_plan_ids(self, now: dt.datetime) -> list[str]:
        """Plans that have not started and whose expiry has passed."""
        waiting = [Phase.AWAITING_APPROVAL.value, Phase.APPROVED.value]

        def read(db: Connection) -> list[str]:
            return list(
                db.scalars(
                    select(PLANS.c.plan_id).where(
                        PLANS.c.phase.in_(waiting),
                        PLANS.c.expire_at.is_not(None),
                        PLANS.c.expire_at <= now,
                    )
                )
            )

        return await self._store.run_core(read)

    async def count_by_phase(self) -> dict[str, int]:
        def read(db: Connection) -> dict[str, int]:
            rows = db.execute(select(PLANS.c.phase, func.count()).group_by(PLANS.c.phase))
            return {phase: int(count) for phase, count in rows}

        return await self._store.run_core(read)

    # --- writes -----------------------------------------------------------------------------

    @staticmethod
    def _insert(db: Connection, plan: Plan, digest: str, transitions: Sequence[Transition]) -> None:
        now = plan.created_at or _utcnow()
        plan.created_at = now
        db.execute(
            _INSERT_PLAN,
            {
                "plan_id": plan.plan_id,
                "request_id": plan.request_id,
                "request_digest": digest,
                "source": plan.source,
                "rationale": plan.rationale,
                "confidence": plan.confidence,
                "submitted_by": plan.submitted_by,
                "phase": plan.phase.value,
                "created_at": now,
                "updated_at": now,
                "expire_at": plan.expire_at,
                "body": body_of(plan),
                "violations": [
                    {
                        "rule_id": v.rule_id,
                        "message": v.message,
                        "field": v.field,
                        "effect": v.effect,
                    }
                    for v in plan.violations
                ],
                "status_message": fit(plan.status_message),
                "version": 1,
            },
        )
        db.execute(
            _INSERT_TARGETS,
            [
                {"plan_id": plan.plan_id, "target": key, "created_at": now}
                for key in plan.target_keys
            ],
        )
        rows, audits = _transition_rows(plan.plan_id, transitions)
        db.execute(_INSERT_TRANSITIONS, rows)
        db.execute(_INSERT_AUDIT, audits)

    async def save(
        self,
        plan: Plan,
        *,
        to_phase: Phase | None = None,
        actor: str = "",
        reason: str = "",
        fence: Fence | None = None,
    ) -> Plan:
        """Writes `plan`'s steps and bookkeeping, and moves it to `to_phase` when given.

        Conditional on the version `plan` was read at (`PlanConflict` otherwise) and, with a
        `fence`, on the controller still holding its lease (`LeaseLost` otherwise).
        """
        now = _utcnow()
        transitions: tuple[Transition, ...] = ()
        new_phase = plan.phase
        if to_phase is not None and to_phase != plan.phase:
            check_transition(plan.phase, to_phase)
            transitions = (Transition(plan.phase, to_phase, now, actor, reason),)
            new_phase = to_phase
        values: dict[str, Any] = {
            "phase": new_phase.value,
            "updated_at": now,
            "body": body_of(plan),
            "status_message": fit(plan.status_message),
            "version": plan.version + 1,
        }

        def write(db: Connection) -> None:
            if fence is not None:
                fence.check(db)
            result = db.execute(
                update(PLANS)
                .where(PLANS.c.plan_id == plan.plan_id, PLANS.c.version == plan.version)
                .values(**values)
            )
            if result.rowcount != 1:
                raise PlanConflict(f"plan {plan.plan_id} changed since version {plan.version}")
            if transitions:
                rows, audits = _transition_rows(plan.plan_id, transitions)
                db.execute(insert(PLAN_TRANSITIONS), rows)
                db.execute(insert(AUDIT_EVENTS), audits)
            if self._bus is not None:
                self._bus.notify(db, PLAN_CHANNEL, plan.plan_id)

        await self._store.run_core(write)
        saved = plan.copy()
        saved.phase = new_phase
        saved.version = plan.version + 1
        saved.updated_at = now
        saved.transitions = plan.transitions + transitions
        self._on_change(PlanChange(saved, transitions))
        return saved
