"""Group commit for small, frequent store transactions.

When thousands of agents connect at once, each session opening is a tiny transaction (one row
upserted, the node's unfinished commands read): run one by one, their fixed costs (a session,
a flush, a commit, a thread hop) are most of the work and they queue behind each other. A
`WriteBatcher` runs what arrives while a batch is being written as the next batch, in one
transaction: at low load a batch is a single work and nothing waits; under a burst batches
grow and the store keeps up. A writer of many items at once (one SELECT ... IN, one
executemany) makes each item cheaper still.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

from controlplane.store._store import Store

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")


class WriteBatcher(Generic[A, R]):
    """Runs `write(session, items)` for items that arrive together, in one transaction, and
    gives each caller of `run(item)` its item's result.

    Each item is acknowledged only after the transaction that carried it committed. A batch
    that fails is run again item by item, each in its own transaction, so one failing item (a
    constraint violation, say) fails only its own caller: `write` must therefore be safe to
    run again after a rollback, as every store transaction is. A caller cancelled while
    waiting does not take its item back: it is (or was) written anyway, as with `Store.run`,
    whose thread cannot be stopped either.
    """

    def __init__(
        self,
        store: Store,
        write: Callable[[Session, list[A]], list[R]],
        *,
        max_batch: int = 256,
    ) -> None:
        self._store = store
        self._write_many = write
        self._max_batch = max_batch
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0
        """Transactions committed (for tests and diagnostics)."""

    @staticmethod
    def of_works(store: Store) -> WriteBatcher[Callable[[Session], Any], Any]:
        """A batcher of closures, each `work(session)` as `Store.run` takes them."""
        return WriteBatcher(store, lambda db, works: [work(db) for work in works])

    async def run(self, item: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="store-write-batcher")
        return await future

    async def _write(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._write_batch(batch)
        finally:
            self._writer = None
            for _item, future in self._pending:  # only when this task itself was cancelled
                if not future.done():
                    future.set_exception(asyncio.CancelledError())
            self._pending.clear()

    async def _write_batch(self, batch: list[tuple[A, asyncio.Future[R]]]) -> None:
        write = self._write_many
        if len(batch) > 1:
            items = [item for item, _future in batch]
            try:
                results = await self._store.run(lambda db: write(db, items))
            except Exception as exc:
                # Rolled back: each item again on its own, so only the failing one fails.
                log.debug("a batch of %d store writes failed (%s): one by one", len(batch), exc)
            else:
                self.batches += 1
                for (_item, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                return
        for item, future in batch:

            def one(db: Session, item: A = item) -> R:
                (result,) = write(db, [item])
                return result

            try:
                result = await self._store.run(one)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                self.batches += 1
                if not future.done():
                    future.set_result(result)
