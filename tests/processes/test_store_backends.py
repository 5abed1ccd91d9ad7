"""The store behaves the same on SQLite and PostgreSQL: run with SENTINEL_TEST_DB=sqlite or
=postgresql (scripts/test.sh runs both); the `database_url` fixture picks the backend."""

from __future__ import annotations

import datetime as dt
import socket
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from controlplane.store import AGENTS, PLANS, Store, StoreError
from controlplane.store._store import _MIGRATIONS

_TABLES = {
    "agents",
    "commands",
    "plans",
    "plan_targets",
    "plan_transitions",
    "policies",
    "audit_events",
    "leases",
}


def _head() -> str:
    head = ScriptDirectory(str(_MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def _schema(db: Connection) -> tuple[str, dict[str, list[str]]]:
    version = db.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    inspector = inspect(db)
    tables = {
        name: sorted(column["name"] for column in inspector.get_columns(name))
        for name in inspector.get_table_names()
    }
    return version, tables


def _agent(node_id: str, seen: dt.datetime, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "node_id": node_id,
        "status": "CONNECTED",
        "first_seen": seen,
        "last_seen": seen,
        "agent_version": "1.0",
        "spiffe_id": f"spiffe://sentinel.local/agent/{node_id}",
        "capabilities": [],
        "inventory": {},
        "last_telemetry_seq": 0,
        "telemetry_gap_samples": 0,
        "cordoned": False,
    }
    row.update(values)
    return row


def _plan(plan_id: str, request_id: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "plan_id": plan_id,
        "request_id": request_id,
        "request_digest": "d" * 64,
        "source": "test",
        "rationale": "",
        "confidence": 0.9,
        "submitted_by": "spiffe://sentinel.local/planner/p",
        "phase": "PENDING",
        "created_at": now,
        "updated_at": now,
        "expire_at": None,
        "body": {"steps": []},
        "violations": [],
        "status_message": "",
        "version": 1,
    }


def test_migrations_reach_head_and_running_them_again_changes_nothing(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.migrate()
        version, tables = store.run_core_sync(_schema)
        assert version == _head()
        assert set(tables) >= _TABLES
        seen = dt.datetime.now(dt.UTC)
        store.run_core_sync(lambda db: db.execute(insert(AGENTS).values(_agent("node-1", seen))))

        store.migrate()

        assert store.run_core_sync(_schema) == (version, tables)
        kept = store.run_core_sync(lambda db: db.execute(select(AGENTS.c.node_id)).scalars().all())
        assert kept == ["node-1"]
    finally:
        store.close()


def test_aware_datetimes_come_back_as_the_same_instant_in_utc(store: Store) -> None:
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    seen = dt.datetime(2024, 3, 1, 9, 15, 30, 123456, tzinfo=india)
    later = seen + dt.timedelta(microseconds=1)
    store.run_core_sync(
        lambda db: db.execute(insert(AGENTS), [_agent("early", seen), _agent("late", later)])
    )

    first_seen = store.run_core_sync(
        lambda db: db.execute(
            select(AGENTS.c.first_seen).where(AGENTS.c.node_id == "early")
        ).scalar_one()
    )
    # Compared in SQL against an instant given in another zone: ordering is by instant.
    after = store.run_core_sync(
        lambda db: (
            db.execute(select(AGENTS.c.node_id).where(AGENTS.c.last_seen > seen)).scalars().all()
        )
    )

    assert first_seen == seen
    assert first_seen.utcoffset() == dt.timedelta(0)
    assert first_seen.hour == 3 and first_seen.minute == 45
    assert after == ["late"]


def test_postgresql_sessions_read_utc_whatever_the_servers_time_zone(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL session setting")
    # The server's (or role's) default time zone, as an operator's server might have it.
    store = Store(f"{database_url}?options=-c%20TimeZone%3DAsia/Kolkata")
    try:
        store.migrate()
        seen = dt.datetime(2024, 3, 1, 3, 45, tzinfo=dt.UTC)
        store.run_core_sync(lambda db: db.execute(insert(AGENTS).values(_agent("n", seen))))
        first_seen = store.run_core_sync(
            lambda db: db.execute(select(AGENTS.c.first_seen)).scalar_one()
        )
    finally:
        store.close()
    assert first_seen == seen
    assert first_seen.utcoffset() == dt.timedelta(0)


def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = dt.datetime(2024, 3, 1, 9, 15)
    with pytest.raises(StatementError, match="naive datetime"):
        store.run_core_sync(lambda db: db.execute(insert(AGENTS).values(_agent("n", naive))))


def test_json_columns_round_trip(store: Store) -> None:
    inventory = {
        "gpus": [{"uuid": "GPU-1", "memory_bytes": 85899345920, "mig": None, "ecc": True}],
        "labels": {"zone": "eu-west-1a", "note": "ünïcödé ✓", "quote": 'a "b" \\ c'},
        "load": 0.25,
        "empty": {},
        "nothing": [],
    }
    capabilities = ["ping", "set_telemetry_interval"]
    seen = dt.datetime.now(dt.UTC)
    store.run_core_sync(
        lambda db: db.execute(
            insert(AGENTS).values(
                _agent("node-1", seen, inventory=inventory, capabilities=capabilities)
            )
        )
    )

    row = store.run_core_sync(
        lambda db: db.execute(select(AGENTS.c.inventory, AGENTS.c.capabilities)).one()
    )

    assert row.inventory == inventory
    assert row.capabilities == capabilities


def test_a_duplicate_plan_request_id_is_an_integrity_error_and_the_store_goes_on(
    store: Store,
) -> None:
    store.run_core_sync(lambda db: db.execute(insert(PLANS).values(_plan("plan-1", "req-1"))))

    with pytest.raises(IntegrityError):
        store.run_core_sync(lambda db: db.execute(insert(PLANS).values(_plan("plan-2", "req-1"))))

    # The failed transaction was rolled back, not left aborted on a pooled connection.
    store.run_core_sync(lambda db: db.execute(insert(PLANS).values(_plan("plan-3", "req-3"))))
    stored = store.run_core_sync(
        lambda db: db.execute(select(PLANS.c.plan_id).order_by(PLANS.c.plan_id)).scalars().all()
    )
    assert stored == ["plan-1", "plan-3"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg"])
def test_an_unreachable_postgresql_is_refused_without_showing_the_password(scheme: str) -> None:
    store = Store(f"{scheme}://sentinel:s3cret-pw@127.0.0.1:{_closed_port()}/sentinel")
    try:
        # A bare postgresql:// URL means psycopg 3 (psycopg2 is not installed).
        assert store.dialect == "postgresql"
        with pytest.raises(StoreError) as refused:
            store.migrate()
    finally:
        store.close()
    message = str(refused.value)
    assert "127.0.0.1" in message
    assert "s3cret-pw" not in message
    assert "***" in message


def test_a_malformed_database_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(StoreError) as refused:
        Store("not a url with s3cret-pw")
    assert "s3cret-pw" not in str(refused.value)
