"""Leadership of the pipeline controller: a lease row in the store with a fencing epoch.

Whoever holds an unexpired lease acts; a holder that stops renewing is replaced once the lease
expires, and the new holder's epoch is higher. Every controller write re-checks, in its own
transaction, that the lease still names this holder at this epoch, so a paused or partitioned
former leader cannot write after it has been replaced (it gets `LeaseLost`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from controlplane.store import LEASES, Bus, Store

log = logging.getLogger(__name__)


LEASE_CHANNEL = "sentinel_lease"
"""Bus channel announcing a released lease (payload: its name)."""


class LeaseLost(Exception):
    """This controller no longer holds the lease; it must stop acting."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of holding a lease at one epoch; writes made under it fail once another holder took
    over."""

    name: str
    holder: str
    epoch: int

    def check(self, db: Connection) -> None:
        # An UPDATE rather than a SELECT: it takes the row's write lock (PostgreSQL) or the
        # database's (SQLite) at once, so no takeover can commit between check and write.
        result = db.execute(
            update(LEASES)
            .where(
                LEASES.c.name == self.name,
                LEASES.c.holder == self.holder,
                LEASES.c.epoch == self.epoch,
            )
            .values(epoch=self.epoch)
        )
        if result.rowcount != 1:
            raise LeaseLost(f"{self.holder} lost the {self.name} lease (epoch {self.epoch})")


class Lease:
    """A named lease in the store that at most one holder has at a time (the controller's
    leadership)."""

    def __init__(
        self,
        store: Store,
        name: str,
        holder: str,
        duration_s: float,
        bus: Bus | None = None,
        holder_alive: Callable[[Connection, str], bool] | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._holder_alive = holder_alive
        self.name = name
        self.holder = holder
        self.duration = dt.timedelta(seconds=duration_s)
        self.fence: Fence | None = None

    async def acquire_or_renew(self) -> Fence | None:
        """Takes the lease when free or expired, renews it when held; None when another holds
        it. Sets and returns the current fence."""

        def attempt(db: Connection) -> Fence | None:
            now = dt.datetime.now(dt.UTC)
            expires = now + self.duration
            row = db.execute(select(LEASES).where(LEASES.c.name == self.name)).first()
            if row is None:
                db.execute(
                    insert(LEASES).values(
                        name=self.name, holder=self.holder, epoch=1, expires_at=expires
                    )
                )
                return Fence(self.name, self.holder, 1)
            mine = self.fence is not None and (row.holder, row.epoch) == (
                self.holder,
                self.fence.epoch,
            )
            if not mine and row.expires_at > now:
                # A holder that is provably dead (its replica's heartbeat row is stale or gone)
                # need not be waited out: fencing stops it should it be only paused.
                if self._holder_alive is None or self._holder_alive(db, row.holder):
                    return None
                log.info("taking the %s lease from %s, which is gone", self.name, row.holder)
            epoch = row.epoch if mine else row.epoch + 1
            result = db.execute(
                update(LEASES)
                .where(LEASES.c.name == self.name, LEASES.c.epoch == row.epoch)
                .values(holder=self.holder, epoch=epoch, expires_at=expires)
            )
            return Fence(self.name, self.holder, epoch) if result.rowcount == 1 else None

        try:
            fence = await self._store.run_core(attempt)
        except IntegrityError:  # another instance inserted the row first
            fence = None
        if fence != self.fence:
            if fence is None:
                log.warning("lost the %s lease", self.name)
            else:
                log.info("holding the %s lease (epoch %d)", self.name, fence.epoch)
        self.fence = fence
        return fence

    async def release(self) -> None:
        """Expires the lease now, so a successor need not wait out its duration."""
        fence = self.fence
        if fence is None:
            return
        self.fence = None

        def write(db: Connection) -> None:
            db.execute(
                update(LEASES)
                .where(
                    LEASES.c.name == fence.name,
                    LEASES.c.holder == fence.holder,
                    LEASES.c.epoch == fence.epoch,
                )
                .values(expires_at=dt.datetime.now(dt.UTC))
            )
            if self._bus is not None:
                # The other replicas' controllers take over now, not at their next poll.
                self._bus.notify(db, LEASE_CHANNEL, fence.name)

        await self._store.run_core(write)
