"""The autonomy breaker's state in the store: one row, changed only by conditional updates, so
that with several replicas judging the same evidence one trip is one change (and one event)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from controlplane.store import AUTONOMY_BREAKER, Store, fit

_ROW = 1


@dataclass(frozen=True, slots=True)
class BreakerState:
    """The breaker as stored: tripped or not, why, and the last reset."""

    tripped: bool = False
    reason: str = ""
    trip_time: dt.datetime | None = None
    tripped_by: str = ""
    """The replica that tripped it."""
    reset_by: str = ""
    reset_time: dt.datetime | None = None
    reset_reason: str = ""
    version: int = 0


class BreakerStore:
    """Reads and changes the breaker row."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @staticmethod
    def _read(db: Connection) -> BreakerState:
        row = db.execute(
            select(AUTONOMY_BREAKER).where(AUTONOMY_BREAKER.c.breaker_id == _ROW)
        ).first()
        if row is None:
            return BreakerState()
        return BreakerState(
            tripped=bool(row.tripped),
            reason=row.reason,
            trip_time=row.trip_time,
            tripped_by=row.tripped_by,
            reset_by=row.reset_by,
            reset_time=row.reset_time,
            reset_reason=row.reset_reason,
            version=row.version,
        )

    async def read(self) -> BreakerState:
        return await self._store.run_core(self._read)

    async def trip(
        self, seen: BreakerState, reason: str, replica: str, at: dt.datetime
    ) -> BreakerState | None:
        """Trips the breaker unless it changed since `seen` (another replica tripped it, or an
        operator reset it meanwhile): the new state when this call tripped it, else None."""

        def write(db: Connection) -> BreakerState | None:
            result = db.execute(
                update(AUTONOMY_BREAKER)
                .where(
                    AUTONOMY_BREAKER.c.breaker_id == _ROW,
                    AUTONOMY_BREAKER.c.version == seen.version,
                    AUTONOMY_BREAKER.c.tripped.is_(False),
                )
                .values(
                    tripped=True,
                    reason=fit(reason),
                    trip_time=at,
                    tripped_by=fit(replica, 128),
                    version=seen.version + 1,
                )
            )
            return self._read(db) if result.rowcount == 1 else None

        return await self._store.run_core(write)

    async def reset(
        self, principal: str, reason: str, at: dt.datetime
    ) -> tuple[BreakerState, bool]:
        """Closes the breaker, recording who, when and why; (the state, whether it was
        tripped). Resetting a closed breaker records the reset too (it restarts the count)."""

        def write(db: Connection) -> tuple[BreakerState, bool]:
            before = self._read(db)
            db.execute(
                update(AUTONOMY_BREAKER)
                .where(AUTONOMY_BREAKER.c.breaker_id == _ROW)
                .values(
                    tripped=False,
                    reset_by=fit(principal, 512),
                    reset_time=at,
                    reset_reason=fit(reason),
                    version=AUTONOMY_BREAKER.c.version + 1,
                )
            )
            return self._read(db), before.tripped

        return await self._store.run_core(write)
