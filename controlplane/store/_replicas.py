"""The replicas of one control plane: who is alive, at which address, and what telemetry each
one's subscribers want from the others.

Each replica writes a heartbeat row every `heartbeat_s`; a row older than `stale_after_s` is a
dead replica, and everything naming it (agent directory entries, telemetry interest) is ignored.
A graceful stop deletes the row at once. Changes of interest are announced on the bus.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from sqlalchemy import Connection, delete, insert, select, update

from controlplane.store._bus import Bus
from controlplane.store._models import REPLICAS
from controlplane.store._store import Store

log = logging.getLogger(__name__)

CHANNEL = "sentinel_replica"
ALL_NODES = "*"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Replica:
    """A live replica as its heartbeat row says."""

    replica_id: str
    address: str
    sessions: int
    interest: frozenset[str]
    """Node ids whose telemetry its subscribers want; contains "*" for every node."""
    interest_version: int

    def wants(self, node_id: str) -> bool:
        return ALL_NODES in self.interest or node_id in self.interest


class Replicas:
    """This replica's heartbeat and the view of the others."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        *,
        address: str,
        heartbeat_s: float,
        stale_after_s: float,
        sessions: Callable[[], int] = lambda: 0,
    ) -> None:
        self._store = store
        self._bus = bus
        self.replica_id = bus.replica_id
        self.address = address
        self.heartbeat_s = heartbeat_s
        self.stale_after = dt.timedelta(seconds=stale_after_s)
        self._sessions = sessions
        self._others: dict[str, Replica] = {}
        self._interest: frozenset[str] = frozenset()
        self._interest_version = 0
        self._listeners: list[Callable[[dict[str, Replica], set[str]], None]] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._lock_file: IO[str] | None = None
        bus.subscribe(CHANNEL, lambda _sender, _payload: self._refresh_soon())
        bus.on_connected(self._refresh_soon)

    def on_change(self, listener: Callable[[dict[str, Replica], set[str]], None]) -> None:
        """Called with (live others, ids of replicas gone since the last call) after a refresh
        that changed something."""
        self._listeners.append(listener)

    # -- reading ------------------------------------------------------------------------------

    def others(self) -> dict[str, Replica]:
        return dict(self._others)

    def is_live(self, replica_id: str) -> bool:
        return replica_id == self.replica_id or replica_id in self._others

    def alive_in(self, db: Connection, replica_id: str) -> bool:
        """Whether `replica_id` has a fresh heartbeat row, read in the caller's transaction (a
        lease takeover decides on it; a cached view could be a heartbeat behind)."""
        if replica_id == self.replica_id:
            return True
        horizon = _utcnow() - self.stale_after
        found = db.execute(
            select(REPLICAS.c.replica_id).where(
                REPLICAS.c.replica_id == replica_id, REPLICAS.c.heartbeat_at >= horizon
            )
        ).first()
        return found is not None

    def wanted_elsewhere(self, node_id: str) -> bool:
        return any(r.wants(node_id) for r in self._others.values())

    # -- lifecycle ----------------------------------------------------------------------------

    async def register(self) -> None:
        """Writes this replica's row. On SQLite, warns when another control plane runs on the
        same file: they share plans, policies and identities, but nothing wakes one of them on
        the other's changes (there is no bus), so commands and telemetry do not cross between
        them. A lock file held for the process's life tells (the kernel drops it when the
        process dies, however it dies)."""
        if self._store.dialect == "sqlite":
            self._lock_sqlite()

        def write(db: Connection) -> None:
            now = _utcnow()
            db.execute(delete(REPLICAS).where(REPLICAS.c.heartbeat_at < now - self.stale_after))
            db.execute(
                insert(REPLICAS).values(
                    replica_id=self.replica_id,
                    address=self.address,
                    started_at=now,
                    heartbeat_at=now,
                    sessions=0,
                    interest=[],
                    interest_version=0,
                )
            )
            self._bus.notify(db, CHANNEL, "new", always=True)

        await self._store.run_core(write)
        await self.refresh()

    def _lock_sqlite(self) -> None:
        path = self._store.sqlite_path()
        if path is None:
            return  # an in-memory database belongs to this process alone
        lock = open(f"{path}.lock", "a+")  # noqa: SIM115 (held open for the process's life)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            log.warning(
                "another control plane is running on the SQLite database %s: plans, policies "
                "and identities are shared, but commands and telemetry do not cross between "
                "the two; several replicas need PostgreSQL (docs/replicas.md)",
                path,
            )
            return
        self._lock_file = lock

    async def deregister(self) -> None:
        """Deletes this replica's row (graceful stop), so others stop counting on it at once."""

        def write(db: Connection) -> None:
            db.execute(delete(REPLICAS).where(REPLICAS.c.replica_id == self.replica_id))
            self._bus.notify(db, CHANNEL, "gone", always=True)

        try:
            await self._store.run_core(write)
        finally:
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    async def run_heartbeat(self) -> None:
        """Heartbeats and refreshes the view every `heartbeat_s` (a supervised task)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.heartbeat()
            await self.refresh()

    async def heartbeat(self) -> None:
        sessions = self._sessions()

        def write(db: Connection) -> int:
            result = db.execute(
                update(REPLICAS)
                .where(REPLICAS.c.replica_id == self.replica_id)
                .values(heartbeat_at=_utcnow(), sessions=sessions)
            )
            return int(result.rowcount)

        if await self._store.run_core(write) == 0:
            # Deleted as stale by another replica (we were paused or cut off): come back.
            log.warning("this replica's row was gone (stale?): registering again")
            await self._store.run_core(self._reinsert)

    def _reinsert(self, db: Connection) -> None:
        now = _utcnow()
        db.execute(
            insert(REPLICAS).values(
                replica_id=self.replica_id,
                address=self.address,
                started_at=now,
                heartbeat_at=now,
                sessions=self._sessions(),
                interest=sorted(self._interest),
                interest_version=self._interest_version,
            )
        )
        self._bus.notify(db, CHANNEL, "back", always=True)

    async def set_interest(self, nodes: frozenset[str]) -> None:
        """Announces which nodes' telemetry this replica's subscribers want from the others."""
        if nodes == self._interest:
            return
        self._interest = nodes
        self._interest_version += 1
        version = self._interest_version

        def write(db: Connection) -> None:
            db.execute(
                update(REPLICAS)
                .where(REPLICAS.c.replica_id == self.replica_id)
                .values(interest=sorted(nodes), interest_version=version)
            )
            self._bus.notify(db, CHANNEL, "interest")

        await self._store.run_core(write)

    @property
    def current_interest(self) -> frozenset[str]:
        return self._interest

    @property
    def interest_version(self) -> int:
        return self._interest_version

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_logged())

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("cannot read the replicas table: %s", exc)

    async def refresh(self) -> None:
        """Re-reads the live replicas (heartbeat fresher than the stale bound)."""

        def read(db: Connection) -> list[Replica]:
            horizon = _utcnow() - self.stale_after
            rows = db.execute(select(REPLICAS).where(REPLICAS.c.heartbeat_at >= horizon))
            return [
                Replica(
                    r.replica_id,
                    r.address,
                    r.sessions,
                    frozenset(r.interest or ()),
                    r.interest_version,
                )
                for r in rows
                if r.replica_id != self.replica_id
            ]

        others = {r.replica_id: r for r in await self._store.run_core(read)}
        gone = set(self._others) - set(others)
        changed = others != self._others
        self._others = others
        for replica_id in gone:
            log.info("replica %s is gone", replica_id)
        if changed:
            for listener in self._listeners:
                listener(dict(others), gone)
