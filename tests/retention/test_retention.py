"""Retention: rows older than their retention are deleted, in bounded batches, and nothing
younger (or still needed) is touched; on SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import collections
import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, insert, select

from controlplane import ControlPlane
from controlplane.fleet import AgentStatus, CommandState
from controlplane.plans import TERMINAL, Phase
from controlplane.retention import Retention, RetentionPolicy
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
from tests.conftest import ControlPlaneFactory, eventually

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
DAY = 86400.0
OLD = NOW - dt.timedelta(days=1, hours=1)  # past a one-day retention
YOUNG = NOW - dt.timedelta(hours=23)  # within it
BATCH = 500


@pytest.fixture
def deletes() -> Iterator[collections.Counter[str]]:
    """DELETE statements sent to the database, by table."""
    counted: collections.Counter[str] = collections.Counter()

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        match = re.match(r"\s*DELETE FROM (\w+)", statement)
        if match:
            counted[match.group(1)] += 1

    event.listen(Engine, "before_cursor_execute", count)
    yield counted
    event.remove(Engine, "before_cursor_execute", count)


def _audit(n: int, at: dt.datetime, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{tag}-{i:06d}",
            "at": at - dt.timedelta(seconds=i),
            "principal": "spiffe://sentinel.local/operator/admin",
            "method": "/sentinel.v1.PlanService/SubmitPlan",
            "target": f"request/{tag}-{i}",
            "outcome": "OK",
            "detail": "",
        }
        for i in range(n)
    ]


def _command(
    command_id: str, state: CommandState, finished: dt.datetime | None, plan: str = ""
) -> dict[str, Any]:
    return {
        "command_id": command_id,
        "node_id": "node-1",
        "plan_id": plan,
        "action": "ping",
        "parameters": {},
        "state": state.value,
        "created_at": (finished or OLD) - dt.timedelta(seconds=5),
        "deadline": (finished or OLD) + dt.timedelta(seconds=60),
        "finished_at": finished,
    }


def _plan(plan_id: str, phase: Phase, updated: dt.datetime) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "request_id": f"req-{plan_id}",
        "request_digest": "0" * 64,
        "source": "test",
        "submitted_by": "spiffe://sentinel.local/planner/inframind",
        "phase": phase.value,
        "created_at": updated - dt.timedelta(minutes=5),
        "updated_at": updated,
        "body": {},
    }


def _transitions(plan_id: str, n: int, at: dt.datetime) -> list[dict[str, Any]]:
    return [
        {
            "plan_id": plan_id,
            "from_phase": "PENDING",
            "to_phase": "VALIDATING",
            "at": at,
            "actor": "test",
            "reason": f"step {i}",
        }
        for i in range(n)
    ]


def _agent(
    node_id: str, status: AgentStatus, last_seen: dt.datetime, cordoned: bool = False
) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "status": status.value,
        "first_seen": last_seen - dt.timedelta(days=30),
        "last_seen": last_seen,
        "last_telemetry_seq": 1234,
        "cordoned": cordoned,
    }


def _events(n: int, at: dt.datetime) -> list[dict[str, Any]]:
    return [
        {
            "at": at,
            "kind": "agent.status",
            "subject": f"node/n-{i}",
            "replica_id": "",
            "payload": {},
        }
        for i in range(n)
    ]


def _seed(db: Connection) -> None:
    db.execute(insert(AUDIT_EVENTS), _audit(1250, OLD, "old") + _audit(20, YOUNG, "young"))
    db.execute(insert(EVENTS), _events(700, OLD) + _events(5, YOUNG))
    db.execute(
        insert(PLANS),
        [
            *(_plan(f"ended-old-{i}", phase, OLD) for i, phase in enumerate(sorted(TERMINAL))),
            _plan("ended-young", Phase.COMPLETED, YOUNG),
            # Active for days (awaiting approval): kept whatever its age.
            _plan("active-old", Phase.AWAITING_APPROVAL, OLD - dt.timedelta(days=10)),
            _plan("executing-old", Phase.EXECUTING, OLD),
        ],
    )
    for i in range(len(TERMINAL)):
        db.execute(insert(PLAN_TRANSITIONS), _transitions(f"ended-old-{i}", 7, OLD))
        db.execute(
            insert(PLAN_TARGETS),
            [
                {"plan_id": f"ended-old-{i}", "target": f"node/n-{t}", "created_at": OLD}
                for t in range(300)
            ],
        )
    for plan_id in ("ended-young", "active-old", "executing-old"):
        db.execute(insert(PLAN_TRANSITIONS), _transitions(plan_id, 3, OLD))
        db.execute(
            insert(PLAN_TARGETS), [{"plan_id": plan_id, "target": "node/n-1", "created_at": OLD}]
        )
    db.execute(
        insert(COMMANDS),
        [
            *(_command(f"old-{i}", CommandState.FINISHED, OLD) for i in range(560)),
            *(_command(f"expired-{i}", CommandState.EXPIRED, OLD) for i in range(10)),
            _command("old-of-ended-plan", CommandState.FINISHED, OLD, plan="ended-old-0"),
            # Its plan still runs: the row is what stops a restarted controller sending it again.
            _command("old-of-running-plan", CommandState.FINISHED, OLD, plan="executing-old"),
            _command("young", CommandState.FINISHED, YOUNG),
            _command("old-unfinished", CommandState.SENT, None),
        ],
    )
    db.execute(
        insert(AGENTS),
        [
            _agent("departed-1", AgentStatus.DISCONNECTED, OLD),
            _agent("departed-2", AgentStatus.DISCONNECTED, OLD - dt.timedelta(days=300)),
            _agent("departed-cordoned", AgentStatus.DISCONNECTED, OLD, cordoned=True),
            _agent("recently-departed", AgentStatus.DISCONNECTED, YOUNG),
            _agent("suspect-long", AgentStatus.SUSPECT, OLD),
            _agent("connected", AgentStatus.CONNECTED, OLD),
        ],
    )


def _keys(store: Store, column: Any) -> set[str]:
    return set(store.run_core_sync(lambda db: list(db.scalars(select(column)))))


def _count(store: Store, table: Any) -> int:
    rows = store.run_core_sync(lambda db: db.scalar(select(func.count()).select_from(table)))
    return int(rows or 0)


def _retention(store: Store, **policy: float) -> Retention:
    return Retention(
        store,
        RetentionPolicy(**policy),
        terminal_plan_phases=[phase.value for phase in TERMINAL],
        finished_command_states=[CommandState.FINISHED.value, CommandState.EXPIRED.value],
        departed_status=AgentStatus.DISCONNECTED.value,
        batch_rows=BATCH,
        pause_s=0.0,
        clock=lambda: NOW,
    )


async def test_rows_past_their_retention_are_pruned_in_batches_and_younger_rows_stay(
    store: Store, deletes: collections.Counter[str]
) -> None:
    store.run_core_sync(_seed)
    retention = _retention(
        store, audit_s=DAY, commands_s=DAY, plans_s=DAY, departed_agents_s=DAY, events_s=DAY
    )

    pruned = await retention.prune_once()

    terminal = len(TERMINAL)
    assert pruned == {
        "audit_events": 1250,
        "events": 700,
        "commands": 571,
        "plans": terminal,
        "plan_transitions": 7 * terminal,
        "plan_targets": 300 * terminal,
        "agents": 2,
    }
    # Audit: exactly the young ones are left.
    assert _keys(store, AUDIT_EVENTS.c.event_id) == {f"young-{i:06d}" for i in range(20)}
    assert _count(store, EVENTS) == 5
    assert _keys(store, COMMANDS.c.command_id) == {
        "old-of-running-plan",
        "young",
        "old-unfinished",
    }
    assert _keys(store, PLANS.c.plan_id) == {"ended-young", "active-old", "executing-old"}
    # Kept plans keep their whole history; pruned plans leave nothing behind.
    assert _keys(store, PLAN_TRANSITIONS.c.plan_id) == {
        "ended-young",
        "active-old",
        "executing-old",
    }
    assert _count(store, PLAN_TRANSITIONS) == 9
    assert _keys(store, PLAN_TARGETS.c.plan_id) == {"ended-young", "active-old", "executing-old"}
    assert _keys(store, AGENTS.c.node_id) == {
        "departed-cordoned",
        "recently-departed",
        "suspect-long",
        "connected",
    }
    # In batches of at most 500 rows: one DELETE per batch, plus the final short one found
    # nothing more only when a batch was full (1,250 audit rows: 500 + 500 + 250).
    assert deletes["audit_events"] == 3
    assert deletes["events"] == 2  # 500 + 200
    assert deletes["commands"] == 2  # 500 + 71
    assert deletes["plan_targets"] == 3  # 1,500 targets: 500 x 3, then an empty look
    assert deletes["plan_transitions"] == 1
    assert deletes["plans"] == 1
    assert deletes["agents"] == 1

    # A second pass finds nothing: everything left is younger than its retention or needed.
    assert await retention.prune_once() == {}


async def test_zero_retention_keeps_everything(
    store: Store, deletes: collections.Counter[str]
) -> None:
    store.run_core_sync(_seed)

    assert await _retention(store).prune_once() == {}

    assert _count(store, AUDIT_EVENTS) == 1270
    assert _count(store, COMMANDS) == 574
    assert _count(store, AGENTS) == 6
    assert sum(deletes.values()) == 0


async def test_a_row_that_changes_between_batch_read_and_delete_is_kept(store: Store) -> None:
    """The delete re-checks its condition: a node that reconnects while its row is picked for
    pruning keeps its row (and two replicas pruning together cannot delete a live node)."""
    store.run_core_sync(
        lambda db: db.execute(insert(AGENTS), [_agent("back", AgentStatus.DISCONNECTED, OLD)])
    )
    retention = _retention(store, departed_agents_s=DAY)
    real_run_core = store.run_core

    async def reconnect_first(work: Any) -> Any:
        def reconnected_then(db: Connection) -> Any:
            keys = list(db.scalars(select(AGENTS.c.node_id)))
            assert keys == ["back"]
            db.execute(AGENTS.update().values(status=AgentStatus.CONNECTED.value, last_seen=NOW))
            return work(db)

        return await real_run_core(reconnected_then)

    store.run_core = reconnect_first  # type: ignore[method-assign]
    try:
        assert await retention.prune_once() == {}
    finally:
        store.run_core = real_run_core  # type: ignore[method-assign]
    assert _keys(store, AGENTS.c.node_id) == {"back"}


async def test_control_plane_prunes_on_its_own_as_the_lease_holder(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    cp: ControlPlane = await control_plane_factory(
        retention_audit_s=3600.0, retention_interval_s=0.2
    )
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await cp.store.run_core(
        lambda db: db.execute(insert(AUDIT_EVENTS), _audit(30, long_ago, "old"))
    )
    await eventually(lambda: cp.controller.leader)

    async def old_rows_gone() -> bool:
        rows = await cp.store.run_core(
            lambda db: db.scalar(select(func.count()).select_from(AUDIT_EVENTS))
        )
        return rows is not None and int(rows) < 30 and not await _old_left(cp)

    await eventually(old_rows_gone, timeout=10)


async def _old_left(cp: ControlPlane) -> bool:
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    rows = await cp.store.run_core(
        lambda db: db.scalar(
            select(func.count()).select_from(AUDIT_EVENTS).where(AUDIT_EVENTS.c.at < cutoff)
        )
    )
    return bool(rows)
