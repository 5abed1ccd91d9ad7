"""Group commit of small store writes (controlplane.store.WriteBatcher), on the real store:
SQLite, and PostgreSQL when the suite runs against it."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controlplane.store import AgentRow, Store, WriteBatcher

NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def _add(node_id: str) -> Callable[[Session], str]:
    def work(db: Session) -> str:
        db.add(AgentRow(node_id=node_id, first_seen=NOW, last_seen=NOW, status="CONNECTED"))
        db.flush()  # a duplicate fails here, inside its own work
        return node_id

    return work


def _stored(store: Store) -> list[str]:
    return store.run_sync(lambda db: list(db.scalars(select(AgentRow.node_id))))


async def test_writes_arriving_together_share_transactions_and_each_is_acknowledged(
    store: Store,
) -> None:
    batcher = WriteBatcher.of_works(store)
    names = [f"node-{i:03d}" for i in range(200)]
    results = await asyncio.gather(*(batcher.run(_add(name)) for name in names))
    assert results == names
    assert sorted(_stored(store)) == names
    # All arrived before the first transaction began: one or two transactions, not 200.
    assert 1 <= batcher.batches <= 2


async def test_a_write_alone_is_written_at_once(store: Store) -> None:
    batcher = WriteBatcher.of_works(store)
    assert await batcher.run(_add("alone")) == "alone"
    assert batcher.batches == 1
    assert _stored(store) == ["alone"]


async def test_a_failing_write_fails_only_its_own_caller(store: Store) -> None:
    batcher = WriteBatcher.of_works(store)
    await batcher.run(_add("taken"))
    names = ["a", "b", "taken", "c", "d"]
    results = await asyncio.gather(
        *(batcher.run(_add(name)) for name in names),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, str)] == ["a", "b", "c", "d"]
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == 1 and isinstance(failed[0], IntegrityError)
    assert sorted(_stored(store)) == ["a", "b", "c", "d", "taken"]


async def test_a_cancelled_caller_does_not_take_its_write_back(store: Store) -> None:
    batcher = WriteBatcher.of_works(store)
    first = asyncio.create_task(batcher.run(_add("first")))
    second = asyncio.create_task(batcher.run(_add("second")))
    await asyncio.sleep(0)
    second.cancel()
    assert await first == "first"
    with pytest.raises(asyncio.CancelledError):
        await second
    await batcher.run(_add("third"))  # written after the batch that carried the second
    assert sorted(_stored(store)) == ["first", "second", "third"]
