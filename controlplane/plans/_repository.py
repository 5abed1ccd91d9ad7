"""Plans in the store: creation with their first transitions, reads, and fenced updates.

Every write bumps the plan's `version` and is conditional on the version it read (optimistic
concurrency between the API and the controller, and between control planes); writes by the
controller also carry its lease epoch, so a deposed leader cannot change anything. New plans
that arrive together are created by one transaction and one commit (group commit).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    String,
    Table,
    TextClause,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
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
    database_unavailable,
    fit,
)

TRANSITION_METHOD = "plan.transition"
# Statements of the submission path, built once: composing them per call cost more CPU than
# the database spent running them.
_INSERT_PLAN = insert(PLANS)
_INSERT_TARGETS = insert(PLAN_TARGETS)
_INSERT_TRANSITIONS = insert(PLAN_TRANSITIONS)
_INSERT_AUDIT = insert(AUDIT_EVENTS)
# The columns a submission writes, per table (and the keys of its rows).
_PLAN_COLUMNS = (
    "plan_id",
    "request_id",
    "request_digest",
    "source",
    "rationale",
    "confidence",
    "submitted_by",
    "phase",
    "created_at",
    "updated_at",
    "expire_at",
    "body",
    "violations",
    "status_message",
    "version",
)
_TARGET_COLUMNS = ("plan_id", "target", "created_at")
_TRANSITION_COLUMNS = ("plan_id", "from_phase", "to_phase", "at", "actor", "reason")
_AUDIT_COLUMNS = ("event_id", "at", "principal", "method", "target", "outcome", "detail")
_WRITTEN = (
    (PLANS, _PLAN_COLUMNS),
    (PLAN_TARGETS, _TARGET_COLUMNS),
    (PLAN_TRANSITIONS, _TRANSITION_COLUMNS),
    (AUDIT_EVENTS, _AUDIT_COLUMNS),
)


def _recordset_insert(table: Table, columns: Sequence[str]) -> str:
    """`INSERT ... SELECT` of `table`'s rows from one JSON array parameter named as the table.
    Strings are read as unbounded VARCHAR: a longer value than the column allows is refused by
    the insert, as a plain INSERT refuses it (a cast to VARCHAR(n) would cut it silently)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    fields = []
    for name in columns:
        sql_type = table.c[name].type
        if isinstance(sql_type, String) and sql_type.length is not None:
            sql_type = String()
        fields.append(f"{name} {sql_type.compile(dialect=dialect)}")
    names = ", ".join(columns)
    return (
        f"INSERT INTO {table.name} ({names}) SELECT {names} "  # noqa: S608
        f"FROM json_to_recordset(CAST(:{table.name} AS json)) AS r({', '.join(fields)})"
    )


# On PostgreSQL a batch is written by ONE statement whatever its size, its rows in one JSON
# document per table: executemany sends every row by itself (a round of the driver each,
# holding the GIL) and arrays are adapted element by element in Python, either of which cost
# more than the rest of the submission. Only table and column names are formatted in.
_INSERT_SUBMISSIONS_PG = text(
    "WITH "
    + ", ".join(
        f"{table.name}_written AS ({_recordset_insert(table, columns)})"
        for table, columns in _WRITTEN[:-1]
    )
    + " "
    + _recordset_insert(*_WRITTEN[-1])
)
_UTC_DATETIME = UtcDateTime()


def _json_rows(table: Table, rows: list[dict[str, Any]]) -> str:
    """`rows` as the JSON array `_recordset_insert` reads: times as ISO 8601 in UTC (checked
    and converted as UtcDateTime binds them), JSON columns nested, so that the stored JSON is
    the text SQLAlchemy's JSON type would have stored."""
    times = [c.name for c in table.columns if isinstance(c.type, UtcDateTime)]
    for row in rows:
        for name in times:
            value = _UTC_DATETIME.process_bind_param(row.get(name), None)
            if value is not None:
                row[name] = value.isoformat()
    return json.dumps(rows)


_PLANS_BY_REQUEST_ID = select(PLANS.c.request_id, PLANS.c.plan_id).where(
    PLANS.c.request_id.in_(bindparam("request_ids", expanding=True))
)

# history.recent counts stop here: "this many or more" (see request_lookup).
RATE_HISTORY_CAP = 100
# Submissions waiting together are written by one transaction (group commit) of at most this
# many plans, or this many targets (always at least one plan): the statement that counts the
# targets' history has a bound parameter per target.
BATCH_PLANS = 64
BATCH_TARGETS = 1_000
# Batches written at once. One commits submissions in the order they were taken in and judges
# every batch on the history of all earlier ones, and, measured, gave more plans per second on
# 2 cores than two (bigger batches: 1.9-2.3 ms of server CPU per plan at 8 in flight, against
# 2.7-2.8 ms with two); submissions queue behind a batch in writing, not behind each other.
BATCHES_IN_FLIGHT = 1
_ACCEPTED_PHASES_EXCLUDED = frozenset({Phase.REJECTED, Phase.CANCELLED})


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


@functools.lru_cache(maxsize=256)
def _recent_counts_query(shape: tuple[int, ...]) -> TextClause:
    """One statement with one capped count per target of each submission (`shape`: how many
    targets each has), each since that submission's own `since` (built once per shape:
    composing it with the expression language cost ~2 ms per submission). Capped because a
    rate-limit rule only asks whether a small threshold is reached, while an uncapped count
    grows with the history of a busy target."""
    rejected = ", ".join(f"'{p.value}'" for p in sorted(_ACCEPTED_PHASES_EXCLUDED))
    # Only integers and the phases' own constants are formatted in; every value is bound.
    columns: list[str] = []
    for n, targets in enumerate(shape):
        for _ in range(targets):
            i = len(columns)
            columns.append(
                f"(SELECT count(*) FROM (SELECT 1 FROM plan_targets pt JOIN plans p "  # noqa: S608
                f"ON p.plan_id = pt.plan_id WHERE pt.target = :t{i} AND pt.created_at >= "
                f":since{n} AND p.phase NOT IN ({rejected}) LIMIT {RATE_HISTORY_CAP}) AS s{i}) "
                f"AS c{i}"
            )
    return text(f"SELECT {', '.join(columns)}").bindparams(
        *(bindparam(f"since{n}", type_=UtcDateTime()) for n in range(len(shape)))
    )


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


@dataclass(eq=False, slots=True)
class _Submission:
    """One submission waiting for its batch: what `submit_new` was given, and its outcome."""

    plan: Plan
    since: dt.datetime
    decide: Callable[[dict[str, int]], Decision]
    history: bool
    outcome: asyncio.Future[Plan | Decision]
    targets: list[str]
    taken: bool = False
    """Taken into a batch: it is written (or refused) by that batch, whatever its caller does."""


def _read_submissions(
    db: Connection, batch: Sequence[_Submission]
) -> tuple[dict[str, str], list[dict[str, int]]]:
    """In one statement each: the plans already stored under the batch's request_ids
    (request_id to plan id), and per submission that asks for history its targets' capped
    counts of accepted plans since its own `since`."""
    stored: dict[str, str] = {
        request_id: plan_id
        for request_id, plan_id in db.execute(
            _PLANS_BY_REQUEST_ID, {"request_ids": [s.plan.request_id for s in batch]}
        )
    }
    counts: list[dict[str, int]] = [{} for _ in batch]
    asking = [
        (n, s)
        for n, s in enumerate(batch)
        if s.history and s.targets and s.plan.request_id not in stored
    ]
    if asking:
        params: dict[str, Any] = {}
        pairs: list[tuple[int, str]] = []
        for k, (n, submission) in enumerate(asking):
            params[f"since{k}"] = submission.since
            for target in submission.targets:
                params[f"t{len(pairs)}"] = target
                pairs.append((n, target))
        shape = tuple(len(s.targets) for _, s in asking)
        values = db.execute(_recent_counts_query(shape), params).one()
        for (n, target), count in zip(pairs, values, strict=True):
            if count:
                counts[n][target] = int(count)
    return stored, counts


class PlanRepository:
    """Stores plans with their transitions and targets; writes are fenced and optimistic."""

    def __init__(
        self,
        store: Store,
        on_change: Callable[[PlanChange], None],
        bus: Bus | None = None,
        *,
        batches_in_flight: int = BATCHES_IN_FLIGHT,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._bus = bus
        self._waiting: collections.deque[_Submission] = collections.deque()
        # No more batches at once than the store has threads to write them.
        self._batch_slots = asyncio.Semaphore(max(1, min(batches_in_flight, store.threads)))
        self._batches: set[asyncio.Task[None]] = set()

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

    async def submit_new(
        self,
        plan: Plan,
        since: dt.datetime,
        decide: Callable[[dict[str, int]], Decision],
        *,
        history: bool = True,
    ) -> Plan | Decision:
        """Submission in ONE transaction: the plan already stored under its request_id (a
        replay: returned as is); otherwise `decide` (the policy verdict, given the per-target
        counts of accepted plans since `since`, or no counts when `history` is False because no
        rule reads them) and, unless it says not to store, the plan with its targets,
        transitions and their audit events. Raises `RequestIdConflict` when another submission
        with the same request_id committed first.

        Submissions that arrive while others are being written are written together by the
        next transaction (group commit), each returned only once that transaction committed;
        each is decided on the history of the plans committed before it and of those ahead of
        it in its batch, as if they had come one after the other."""
        outcome: asyncio.Future[Plan | Decision] = asyncio.get_running_loop().create_future()
        submission = _Submission(plan, since, decide, history, outcome, plan.target_keys)
        self._waiting.append(submission)
        try:
            while not submission.taken:
                await self._batch_slots.acquire()
                if submission.taken:  # written by a batch that started meanwhile
                    self._batch_slots.release()
                    break
                self._start_batch()
        except asyncio.CancelledError:
            if not submission.taken:  # never written: the caller knows nothing was stored
                self._waiting.remove(submission)
            raise
        return await submission.outcome

    def _start_batch(self) -> None:
        """Takes the longest run of waiting submissions (in arrival order) that fits a batch
        and writes it in a task of its own, which releases the batch slot when done: callers
        that give up (a cancelled RPC) do not stop the batch that writes the others."""
        batch: list[_Submission] = []
        request_ids: set[str] = set()
        targets = 0
        while self._waiting and len(batch) < BATCH_PLANS:
            submission = self._waiting[0]
            if submission.plan.request_id in request_ids:
                break  # the second of two alike is judged after the first committed: a replay
            targets += len(submission.targets)
            if batch and targets > BATCH_TARGETS:
                break
            self._waiting.popleft()
            submission.taken = True
            batch.append(submission)
            request_ids.add(submission.plan.request_id)
        task = asyncio.create_task(self._write_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _write_batch(self, batch: list[_Submission]) -> None:
        try:
            await self._write_together(batch)
        except BaseException as exc:  # handed to every caller still waiting: they report it
            for submission in batch:
                _settle(submission, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._batch_slots.release()

    async def _write_together(self, batch: list[_Submission]) -> None:
        try:
            outcomes = await self._store.run_core(lambda db: self._submit_batch(db, batch))
        except Exception as exc:
            if len(batch) > 1 and not database_unavailable(exc):
                # One plan's row may have failed them all (its request_id committed meanwhile
                # by another control plane, say): each is written again on its own, and fails
                # or succeeds as it would have alone.
                for submission in batch:
                    await self._write_together([submission])
                return
            if len(batch) == 1 and isinstance(exc, IntegrityError):
                existing = await self.find_by_request_id(batch[0].plan.request_id)
                if existing is not None:
                    _settle(batch[0], RequestIdConflict(existing.plan_id))
                    return
            for submission in batch:
                _settle(submission, exc)
            return
        for submission, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Decision) and outcome.store:
                stored = outcome.plan
                stored.version = 1
                stored.updated_at = stored.created_at
                stored.transitions = tuple(outcome.transitions)
                try:
                    self._on_change(PlanChange(stored, stored.transitions))
                except Exception as exc:
                    _settle(submission, exc)
                    continue
            _settle(submission, outcome)

    def _submit_batch(
        self, db: Connection, batch: Sequence[_Submission]
    ) -> list[Plan | Decision | BaseException]:
        """The transaction of a batch (see `submit_new`): a failure of one submission's
        `decide` is that submission's outcome and leaves the others be."""
        stored, counts = _read_submissions(db, batch)
        outcomes: list[Plan | Decision | BaseException] = []
        accepted: list[tuple[dt.datetime, list[str]]] = []  # earlier in this batch
        inserts: list[Decision] = []
        for submission, recent in zip(batch, counts, strict=True):
            plan_id = stored.get(submission.plan.request_id)
            if plan_id is not None and (existing := self._read(db, plan_id)) is not None:
                outcomes.append(existing)
                continue
            if submission.history and accepted:
                wanted = set(submission.targets)
                for created_at, targets in accepted:
                    if created_at >= submission.since:
                        for target in wanted.intersection(targets):
                            recent[target] = min(recent.get(target, 0) + 1, RATE_HISTORY_CAP)
            try:
                decision = submission.decide(recent)
            except Exception as exc:
                outcomes.append(exc)
                continue
            outcomes.append(decision)
            if decision.store:
                inserts.append(decision)
                plan = decision.plan
                plan.created_at = plan.created_at or _utcnow()
                if plan.phase not in _ACCEPTED_PHASES_EXCLUDED:
                    accepted.append((plan.created_at, plan.target_keys))
        if inserts:
            self._insert(db, inserts)
            if self._bus is not None:
                self._bus.notify_many(db, PLAN_CHANNEL, [d.plan.plan_id for d in inserts])
        return outcomes

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
    def _insert(db: Connection, decisions: Sequence[Decision]) -> None:
        """The decided plans with their targets, transitions and audit events, all of them at
        once: one statement on PostgreSQL, one per table elsewhere."""
        plans: list[dict[str, Any]] = []
        targets: list[dict[str, Any]] = []
        transitions: list[dict[str, Any]] = []
        audits: list[dict[str, Any]] = []
        for decision in decisions:
            plan = decision.plan
            now = plan.created_at or _utcnow()
            plan.created_at = now
            plans.append(
                {
                    "plan_id": plan.plan_id,
                    "request_id": plan.request_id,
                    "request_digest": decision.digest,
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
                }
            )
            targets += (
                {"plan_id": plan.plan_id, "target": key, "created_at": now}
                for key in plan.target_keys
            )
            rows, events = _transition_rows(plan.plan_id, decision.transitions)
            transitions += rows
            audits += events
        if db.dialect.name == "postgresql":
            db.execute(
                _INSERT_SUBMISSIONS_PG,
                {
                    table.name: _json_rows(table, rows)
                    for (table, _), rows in zip(
                        _WRITTEN, (plans, targets, transitions, audits), strict=True
                    )
                },
            )
            return
        db.execute(_INSERT_PLAN, plans)
        db.execute(_INSERT_TARGETS, targets)
        if transitions:
            db.execute(_INSERT_TRANSITIONS, transitions)
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


def _settle(submission: _Submission, outcome: Plan | Decision | BaseException) -> None:
    """Hands a submission its outcome, unless its caller gave up waiting for it."""
    if submission.outcome.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        submission.outcome.cancel()
    elif isinstance(outcome, BaseException):
        submission.outcome.set_exception(outcome)
    else:
        submission.outcome.set_result(outcome)
