"""Group commit for small, frequent store transactions.

When thousands of agents connect at once, each session opening is a tiny transaction (one row
upserted, the node's unfinished commands read): run one by one, their fixed costs (a session,
a flush, a commit, a thread hop) are most of the work and they queue behind each other. A
`WriteBatcher` runs what arrives while a batch is being written as the next batch, in one
transaction: at low load a batch is a single work and nothing waits; under a burst batches
grow and the store keeps up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from controlplane.store._store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

_Work = tuple[Callable[[Session], Any], "asyncio.Future[Any]"]


class WriteBatcher:
    """Runs `work(session)` like `Store.run`, grouped with other works into one transaction.

    Each work is acknowledged only after the transaction that carried it committed. A batch
    that fails is run again work by work, each in its own transaction, so one failing work
    (a constraint violation, say) fails only its own caller. Works must therefore be safe to
    run twice when the first attempt was rolled back: as every store transaction is.
    A caller cancelled while waiting does not take its work back: it runs (or has run) anyway,
    as with `Store.run`, whose thread cannot be stopped either.
    """

    def __init__(self, store: Store, *, max_batch: int = 256) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[_Work] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0
        """Transactions written (for tests and diagnostics)."""

    async def run(self, work: Callable[[Session], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((work, future))
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
            for _work, future in self._pending:  # only when this task itself was cancelled
                if not future.done():
                    future.set_exception(asyncio.CancelledError())
            self._pending.clear()

    async def _write_batch(self, batch: list[_Work]) -> None:
        if len(batch) > 1:
            works = [work for work, _future in batch]
            try:
                results = await self._store.run(lambda db: [work(db) for work in works])
            except Exception as exc:
                # Rolled back: each work again on its own, so only the failing one fails.
                log.debug("a batch of %d store writes failed (%s): one by one", len(batch), exc)
            else:
                self.batches += 1
                for (_work, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                return
        for work, future in batch:
            try:
                result = await self._store.run(work)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                self.batches += 1
                if not future.done():
                    future.set_result(result)
