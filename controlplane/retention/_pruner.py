"""The pruner: deletes rows older than their retention, a bounded batch per transaction with a
pause between batches, so neither the database nor the store thread is ever held for long.

Every delete re-checks its condition on the rows it names, so a row that changed between the
batch's read and its delete (a node that came back, say) is kept, and two replicas pruning at
once only do the same work twice: deletes are idempotent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy import Connection, and_, delete, exists, not_, or_, select, tuple_
from sqlalchemy.sql.elements import ColumnElement

from controlplane.store import (
    AGENTS,
    AUDIT_EVENTS,
    COMMANDS,
    EVENTS,
    PLAN_TARGETS,
    PLAN_TRANSITIONS,
    PLANS,
    Store,
)

log = logging.getLogger(__name__)

BATCH_ROWS = 500
"""Rows deleted per transaction at most."""
BATCH_PAUSE_S = 0.05
"""Pause between two batches: other work gets the store thread (and SQLite's lock) between."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long each kind of row is kept, in seconds; 0 keeps it forever."""

    audit_s: float = 0.0
    """Audit events, by the time they happened."""
    commands_s: float = 0.0
    """Finished or expired commands, by when they finished (never those of an active plan)."""
    plans_s: float = 0.0
    """Plans in a terminal phase, with their transitions and targets, by their last change."""
    departed_agents_s: float = 0.0
    """Agent rows (inventory, telemetry watermark) of nodes Disconnected for this long and not
    cordoned."""
    events_s: float = 0.0
    """Domain events (WatchEvents, sinks), by the time they happened."""


class Retention:
    """Prunes what the policy says has been kept long enough, a batch at a time."""

    def __init__(
        self,
        store: Store,
        policy: RetentionPolicy,
        *,
        terminal_plan_phases: Collection[str],
        finished_command_states: Collection[str],
        departed_status: str,
        should_run: Callable[[], bool] = lambda: True,
        batch_rows: int = BATCH_ROWS,
        pause_s: float = BATCH_PAUSE_S,
        clock: Callable[[], dt.datetime] = _utcnow,
        on_pruned: Callable[[str, int], None] | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._terminal = sorted(terminal_plan_phases)
        self._finished = sorted(finished_command_states)
        self._departed = departed_status
        self._should_run = should_run
        self._batch = max(int(batch_rows), 1)
        self._pause_s = pause_s
        self._clock = clock
        self._on_pruned = on_pruned

    async def run(self, interval_s: float) -> None:
        """Prunes every `interval_s` for the process's life (while `should_run` says so)."""
        while True:
            await asyncio.sleep(interval_s)
            if self._should_run():
                await self.prune_once()

    async def prune_once(self) -> dict[str, int]:
        """One pass over every table; returns the rows deleted per table."""
        policy = self._policy
        now = self._clock()
        pruned: dict[str, int] = {}

        def cutoff(seconds: float) -> dt.datetime:
            return now - dt.timedelta(seconds=seconds)

        if policy.events_s > 0:
            c = cutoff(policy.events_s)
            pruned["events"] = await self._prune(
                EVENTS.c.event_id, EVENTS.c.at < c, order_by=EVENTS.c.event_id
            )
        if policy.audit_s > 0:
            c = cutoff(policy.audit_s)
            pruned["audit_events"] = await self._prune(
                AUDIT_EVENTS.c.event_id, AUDIT_EVENTS.c.at < c
            )
        if policy.commands_s > 0:
            pruned["commands"] = await self._prune(
                COMMANDS.c.command_id, self._finished_commands(cutoff(policy.commands_s))
            )
        if policy.plans_s > 0:
            pruned.update(await self._prune_plans(cutoff(policy.plans_s)))
        if policy.departed_agents_s > 0:
            c = cutoff(policy.departed_agents_s)
            pruned["agents"] = await self._prune(
                AGENTS.c.node_id,
                and_(
                    AGENTS.c.status == self._departed,
                    AGENTS.c.last_seen < c,
                    # A cordon is an operator's intent about the machine; it outlives absence.
                    not_(AGENTS.c.cordoned),
                ),
            )
        pruned = {table: rows for table, rows in pruned.items() if rows}
        if pruned:
            log.info(
                "retention pruned %s",
                ", ".join(f"{rows} {table}" for table, rows in sorted(pruned.items())),
            )
        return pruned

    def _finished_commands(self, before: dt.datetime) -> ColumnElement[bool]:
        # A command of a plan still running is the ledger's memory that it was sent: without
        # the row, a restarted controller would send it a second time.
        active_plan = exists().where(
            PLANS.c.plan_id == COMMANDS.c.plan_id, PLANS.c.phase.not_in(self._terminal)
        )
        return and_(
            COMMANDS.c.state.in_(self._finished),
            COMMANDS.c.finished_at < before,
            or_(COMMANDS.c.plan_id == "", not_(active_plan)),
        )

    async def _prune(
        self,
        key: ColumnElement[object],
        condition: ColumnElement[bool],
        *,
        order_by: ColumnElement[object] | None = None,
    ) -> int:
        """Deletes the rows matching `condition`, `batch_rows` per transaction."""
        table = key.table
        query = select(key).where(condition).limit(self._batch)
        if order_by is not None:
            query = query.order_by(order_by)

        def batch(db: Connection) -> int:
            keys = list(db.scalars(query))
            if not keys:
                return 0
            return int(db.execute(delete(table).where(key.in_(keys), condition)).rowcount)

        return await self._batches(str(table.name), batch)

    async def _prune_plans(self, before: dt.datetime) -> dict[str, int]:
        """Ended plans go whole: a plan without its transitions would tell a wrong story."""
        ended = and_(PLANS.c.phase.in_(self._terminal), PLANS.c.updated_at < before)
        candidates = select(PLANS.c.plan_id).where(ended).limit(self._batch)
        counts = {"plans": 0, "plan_transitions": 0, "plan_targets": 0}
        while True:
            plan_ids: list[str] = await self._store.run_core(
                lambda db: list(db.scalars(candidates))
            )
            if not plan_ids:
                return counts
            deleted = await self._prune_plan_batch(plan_ids, ended)
            for table, rows in deleted.items():
                counts[table] += rows
            if deleted["plans"] == 0:
                return counts  # the candidates changed under us; the next pass looks again
            await asyncio.sleep(self._pause_s)

    async def _prune_plan_batch(
        self, plan_ids: list[str], ended: ColumnElement[bool]
    ) -> dict[str, int]:
        """Deletes these plans' transitions and targets (children first, each in bounded
        batches: a plan may have many targets), then the plans; a crash in between leaves
        ended plans that the next pass finishes."""
        transitions = (
            select(PLAN_TRANSITIONS.c.id)
            .where(PLAN_TRANSITIONS.c.plan_id.in_(plan_ids))
            .limit(self._batch)
        )
        targets = (
            select(PLAN_TARGETS.c.plan_id, PLAN_TARGETS.c.target)
            .where(PLAN_TARGETS.c.plan_id.in_(plan_ids))
            .limit(self._batch)
        )
        target_key = tuple_(PLAN_TARGETS.c.plan_id, PLAN_TARGETS.c.target)

        def transition_batch(db: Connection) -> int:
            keys = list(db.scalars(transitions))
            if not keys:
                return 0
            stmt = delete(PLAN_TRANSITIONS).where(PLAN_TRANSITIONS.c.id.in_(keys))
            return int(db.execute(stmt).rowcount)

        def target_batch(db: Connection) -> int:
            keys = [tuple(row) for row in db.execute(targets)]
            if not keys:
                return 0
            return int(db.execute(delete(PLAN_TARGETS).where(target_key.in_(keys))).rowcount)

        def plan_batch(db: Connection) -> int:
            stmt = delete(PLANS).where(PLANS.c.plan_id.in_(plan_ids), ended)
            return int(db.execute(stmt).rowcount)

        return {
            "plan_transitions": await self._batches("plan_transitions", transition_batch),
            "plan_targets": await self._batches("plan_targets", target_batch),
            "plans": await self._batches("plans", plan_batch),
        }

    async def _batches(self, table: str, batch: Callable[[Connection], int]) -> int:
        """Runs `batch` (one transaction each) until it deletes nothing or a short batch."""
        total = 0
        while True:
            deleted = await self._store.run_core(batch)
            total += deleted
            if deleted and self._on_pruned is not None:
                self._on_pruned(table, deleted)
            if deleted < self._batch:
                return total
            await asyncio.sleep(self._pause_s)
