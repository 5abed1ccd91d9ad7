"""The fleet registry: which agents exist, which session each holds, and how alive they are.

Liveness is judged from what the control plane hears: a node whose session ends or falls silent
for `suspect_after` becomes Suspect; Suspect for `disconnect_after` makes it Disconnected.
Status changes are written through to the store at once; `last_seen` is written in batches.

With several replicas on one PostgreSQL, every replica keeps the whole fleet in memory, and the
`agents` rows are also the agent directory: which replica holds each node's session. A replica
judges the liveness of the nodes it holds (and of nodes nobody holds); changes are announced on
the bus, and the other replicas re-read those rows. Every status write is conditional on the
session the writer believes current, so a replica that lost a node to another never overwrites
the newer holder's entry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controlplane.fleet._model import (
    AgentSession,
    AgentState,
    AgentStatus,
    HelloInfo,
    Liveness,
    compact_inventory,
)
from controlplane.store import AGENTS, REPLICAS, AgentRow, Bus, Replicas, Store, WriteBatcher

log = logging.getLogger(__name__)

AGENT_CHANNEL = "sentinel_agent"
_ids = random.Random()  # noqa: S311  # seeded from the OS at import; ids, not secrets
# Nodes judged by the liveness sweep between two yields to the event loop.
_SWEEP_SLICE = 2000
# Seconds between full re-reads of the directory: the safety net under the bus.
DIRECTORY_REFRESH_S = 30.0


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class _Agent:
    """The registry's record of one node. What changes per message (liveness, last seen,
    telemetry seq) are plain numbers here, so the hot path allocates nothing the garbage
    collector has to track; `snapshot()` builds the public view on demand."""

    state: AgentState
    last_heard: float  # monotonic
    last_seen: float  # unix time
    seq: int
    gaps: int
    session: AgentSession | None = None
    replica: str = ""
    """The replica holding the node's session, as the directory says ("" when none)."""
    session_key: str = ""
    """The directory's session id for the node: status writes are conditional on it."""
    inventory_stamp: tuple[str, dt.datetime | None] | None = None
    """(session id, connected at) of the row the inventory was taken from: the inventory only
    changes when a session opens, so a re-read row with the same stamp keeps the one held."""

    def snapshot(self) -> AgentState:
        return replace(
            self.state,
            last_seen=dt.datetime.fromtimestamp(self.last_seen, dt.UTC),
            last_telemetry_seq=self.seq,
            telemetry_gap_samples=self.gaps,
            replica_id=self.replica,
            replica_address=self.state.replica_address if self.replica else "",
            connected_at=self.state.connected_at if self.replica else None,
        )


@dataclass(frozen=True, slots=True)
class _Opening:
    """A session to register in the directory (one item of a batched write)."""

    hello: HelloInfo
    session_id: str
    held_seq: int
    """The telemetry high-water mark this replica holds for the node (0: none)."""
    held_gaps: int
    now: dt.datetime


class _Opened(NamedTuple):
    """A registered node's telemetry high-water mark, gaps, first sight and cordon."""

    seq: int
    gaps: int
    first_seen: dt.datetime
    cordoned: bool


_OPENING_UPDATE = (
    update(AGENTS)
    .where(AGENTS.c.node_id == bindparam("key"))
    .values(
        {
            name: bindparam(f"v_{name}")  # a bind may not bear its column's name
            for name in (
                "status",
                "last_seen",
                "agent_version",
                "spiffe_id",
                "capabilities",
                "inventory",
                "last_telemetry_seq",
                "telemetry_gap_samples",
                "replica_id",
                "session_id",
                "connected_at",
            )
        }
    )
)


class WatcherOverflow(Exception):
    """A WatchAgents subscriber fell too far behind and was cut off."""


class AgentRegistry:
    """Which agents exist, which are connected, and their liveness, inventory and cordon state."""

    def __init__(
        self,
        store: Store,
        *,
        suspect_after_s: float,
        disconnect_after_s: float,
        on_status_counts: Callable[[dict[AgentStatus, int]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        replicas: Replicas | None = None,
        bus: Bus | None = None,
        on_status_changed: Callable[[AgentState, AgentStatus | None], None] | None = None,
    ) -> None:
        self._store = store
        # Session openings arriving together (a reconnect storm) are written together.
        self._openings = WriteBatcher(store, self._write_openings)
        # Called with (new state, previous status or None) for each status change this replica
        # wrote to the store (not for those it learned from other replicas' rows).
        self._on_status_changed = on_status_changed
        self._replicas = replicas
        self._bus = bus
        self.replica_id = replicas.replica_id if replicas else ""
        self._to_reload: set[str] = set()
        self._reloading: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        if bus is not None:
            bus.subscribe(AGENT_CHANNEL, self._on_notice)
            bus.on_connected(lambda: self._reload_soon(None))
        self._suspect_after = suspect_after_s
        self._disconnect_after = disconnect_after_s
        self._on_status_counts = on_status_counts
        self._clock = clock
        self._agents: dict[str, _Agent] = {}
        self._counts: dict[AgentStatus, int] = dict.fromkeys(AgentStatus, 0)
        # Nodes not CONNECTED, kept as statuses change: the breaker reads them every few
        # seconds, which must not cost a pass over the whole fleet.
        self._unhealthy: dict[str, _Agent] = {}
        self._dirty_last_seen: set[str] = set()
        self._watchers: set[asyncio.Queue[AgentState | None]] = set()

    # -- loading and reading --------------------------------------------------------------

    async def load(self) -> None:
        """Reads the registry from the store. Nodes that were connected when the control plane
        stopped become Suspect: they get the full grace period to come back."""

        def read(session: Session) -> list[AgentRow]:
            rows = list(session.scalars(select(AgentRow)))
            # Sessions held by a live replica stay as they are; the rest were ours or a dead
            # replica's, and get the grace period to come back.
            orphans = [
                r.node_id
                for r in rows
                if r.status == AgentStatus.CONNECTED.value
                and not self._held_elsewhere(r.replica_id)
            ]
            for chunk in range(0, len(orphans), 500):
                session.execute(
                    update(AgentRow)
                    .where(AgentRow.node_id.in_(orphans[chunk : chunk + 500]))
                    .values(status=AgentStatus.SUSPECT.value, replica_id="", session_id="")
                )
            return rows

        now = self._clock()
        for row in await self._store.run(read):
            status = AgentStatus(row.status)
            held = self._held_elsewhere(row.replica_id)
            if status is AgentStatus.CONNECTED and not held:
                status = AgentStatus.SUSPECT
            inventory_json, kubernetes_node_name = compact_inventory(row.inventory)
            state = AgentState(
                node_id=row.node_id,
                status=status,
                first_seen=row.first_seen,
                last_seen=row.last_seen,
                agent_version=row.agent_version,
                spiffe_id=row.spiffe_id,
                capabilities=tuple(row.capabilities),
                inventory_json=inventory_json,
                kubernetes_node_name=kubernetes_node_name,
                last_telemetry_seq=row.last_telemetry_seq,
                telemetry_gap_samples=row.telemetry_gap_samples,
                cordoned=row.cordoned,
                session_id=row.session_id if held else "",
                replica_address=self._address_of(row.replica_id) if held else "",
                connected_at=row.connected_at if held else None,
            )
            agent = self._agents[row.node_id] = _Agent(
                state,
                last_heard=now,
                last_seen=row.last_seen.timestamp(),
                seq=row.last_telemetry_seq,
                gaps=row.telemetry_gap_samples,
                replica=row.replica_id if held else "",
                session_key=row.session_id if held else "",
                inventory_stamp=(row.session_id, row.connected_at),
            )
            self._count(agent, None)
        self._publish_counts()

    def _held_elsewhere(self, replica_id: str) -> bool:
        return (
            self._replicas is not None
            and bool(replica_id)
            and replica_id != self.replica_id
            and self._replicas.is_live(replica_id)
        )

    def _address_of(self, replica_id: str) -> str:
        if self._replicas is None or not replica_id:
            return ""
        if replica_id == self.replica_id:
            return self._replicas.address
        other = self._replicas.others().get(replica_id)
        return other.address if other else ""

    def holder_of(self, node_id: str) -> str | None:
        """The live replica holding the node's session: this one, another, or None."""
        agent = self._agents.get(node_id)
        if agent is None:
            return None
        if agent.session is not None:
            return self.replica_id
        return agent.replica if self._held_elsewhere(agent.replica) else None

    def get(self, node_id: str) -> AgentState | None:
        agent = self._agents.get(node_id)
        return agent.snapshot() if agent else None

    def agents(self, status: AgentStatus | None = None) -> list[AgentState]:
        return sorted(
            (a.snapshot() for a in self._agents.values() if status in (None, a.state.status)),
            key=lambda s: s.node_id,
        )

    def unhealthy(self) -> list[Liveness]:
        """The nodes not CONNECTED (Suspect, Disconnected) and when each was last seen; cheap
        however large the fleet, as long as most of it is healthy."""
        return [
            Liveness(node_id, agent.state.status, agent.last_seen)
            for node_id, agent in self._unhealthy.items()
        ]

    def known(self, node_id: str) -> bool:
        return node_id in self._agents

    def count(self, status: AgentStatus | None = None) -> int:
        if status is None:
            return len(self._agents)
        return self._counts[status]

    def cordoned(self) -> frozenset[str]:
        return frozenset(n for n, a in self._agents.items() if a.state.cordoned)

    def is_cordoned(self, node_id: str) -> bool:
        agent = self._agents.get(node_id)
        return agent is not None and agent.state.cordoned

    def agent_on_kubernetes_node(self, name: str) -> str | None:
        """The node id of the agent that reported being Kubernetes node `name` (the most
        recently seen one, should two claim it), or None."""
        claims = [
            (agent.state.last_seen, node_id)
            for node_id, agent in self._agents.items()
            if agent.state.kubernetes_node_name == name
        ]
        return max(claims)[1] if claims else None

    async def set_cordoned(self, node_id: str, cordoned: bool) -> None:
        """Records the node's place in Sentinel's scheduling view (after its agent acted)."""
        agent = self._agents.get(node_id)
        if agent is None:
            return
        self._set_state(agent, replace(agent.state, cordoned=cordoned))
        log.info("node %s", "cordoned" if cordoned else "uncordoned", extra={"node_id": node_id})
        self._notify(agent.snapshot())

        bus = self._bus

        def write(db: Connection) -> None:
            db.execute(update(AGENTS).where(AGENTS.c.node_id == node_id).values(cordoned=cordoned))
            if bus is not None:
                bus.notify(db, AGENT_CHANNEL, node_id)

        await self._store.run_core(write)

    def session_for(self, node_id: str) -> AgentSession | None:
        agent = self._agents.get(node_id)
        return agent.session if agent else None

    def sessions(self) -> list[AgentSession]:
        return [a.session for a in self._agents.values() if a.session is not None]

    # -- sessions -----------------------------------------------------------------------

    async def open_session(self, hello: HelloInfo) -> tuple[AgentSession, AgentState]:
        """Registers a new session for `hello.node_id`, superseding an older one (here or on
        another replica: the directory entry is this replica's from now on).

        A caller cancelled meanwhile (the agent went away) gets CancelledError at once, but the
        registration runs to its end and the session is then closed as any ended one: the
        store write cannot be taken back once its thread has started, and a row naming a
        session that nobody serves would show the node Connected until this replica died."""
        opening = asyncio.ensure_future(self._open_session(hello))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            self._spawn_write(self._close_abandoned(opening))
            raise

    def _write_openings(self, db: Session, openings: list[_Opening]) -> list[_Opened]:
        """Registers sessions in the directory: for all of them one SELECT of the rows (locked,
        in node order), one INSERT of the new nodes, one UPDATE of the known ones."""
        connection = db.connection()
        known: dict[str, _Opened] = {
            row.node_id: _Opened(
                row.last_telemetry_seq, row.telemetry_gap_samples, row.first_seen, row.cordoned
            )
            for row in connection.execute(
                select(
                    AGENTS.c.node_id,
                    AGENTS.c.last_telemetry_seq,
                    AGENTS.c.telemetry_gap_samples,
                    AGENTS.c.first_seen,
                    AGENTS.c.cordoned,
                )
                .where(AGENTS.c.node_id.in_(sorted({o.hello.node_id for o in openings})))
                .order_by(AGENTS.c.node_id)
                .with_for_update()
            )
        }
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        results: list[_Opened] = []
        for opening in openings:
            hello = opening.hello
            row = known.get(hello.node_id)
            # The row is the truth when the node was last held by another replica.
            seq = max(opening.held_seq, row.seq if row else 0)
            gaps = max(opening.held_gaps, row.gaps if row else 0)
            if seq > max(hello.next_telemetry_seq - 1, 0):
                # The agent never produced the samples we hold: its state directory was reset.
                # Trust its numbering from here, or every new sample would be dropped as a
                # duplicate.
                log.warning(
                    "agent telemetry seq restarted (held %d, agent's next is %d): state was reset",
                    seq,
                    hello.next_telemetry_seq,
                    extra={"node_id": hello.node_id},
                )
                seq = max((hello.oldest_unacked_seq or hello.next_telemetry_seq) - 1, 0)
            values = {
                "key": hello.node_id,
                "status": AgentStatus.CONNECTED.value,
                "last_seen": opening.now,
                "agent_version": hello.agent_version,
                "spiffe_id": hello.spiffe_id,
                "capabilities": list(hello.capabilities),
                "inventory": hello.inventory,
                "last_telemetry_seq": seq,
                "telemetry_gap_samples": gaps,
                "replica_id": self.replica_id,
                "session_id": opening.session_id,
                "connected_at": opening.now,
            }
            if row is None:
                row = _Opened(seq, gaps, opening.now, False)
                inserts.append({**values, "first_seen": opening.now, "cordoned": False})
            else:
                row = _Opened(seq, gaps, row.first_seen, bool(row.cordoned))
                updates.append(values)
            known[hello.node_id] = row
            results.append(row)
        if inserts:
            connection.execute(
                insert(AGENTS),
                [{"node_id" if k == "key" else k: v for k, v in i.items()} for i in inserts],
            )
        if updates:
            connection.execute(
                _OPENING_UPDATE,
                [{k if k == "key" else f"v_{k}": v for k, v in u.items()} for u in updates],
            )
        if self._bus is not None:
            for node_id in sorted({o.hello.node_id for o in openings}):
                self._bus.notify(connection, AGENT_CHANNEL, node_id)
        return results

    async def _close_abandoned(
        self, opening: asyncio.Future[tuple[AgentSession, AgentState]]
    ) -> None:
        try:
            session, _state = await opening
        except Exception:
            return  # nothing was registered (the write failed)
        await self.close_session(session, "cancelled while the session was being registered")

    async def _open_session(self, hello: HelloInfo) -> tuple[AgentSession, AgentState]:
        now = _utcnow()
        # 128 random bits, as uuid4 has, without its system call per session (a reconnect
        # storm opens thousands a second); a session id names a session, it is no secret.
        session = AgentSession(session_id=f"{_ids.getrandbits(128):032x}", node_id=hello.node_id)
        known = self._agents.get(hello.node_id)
        previous = known.state.status if known else None
        held_seq = known.seq if known else 0
        held_gaps = known.gaps if known else 0
        opening = _Opening(hello, session.session_id, held_seq, held_gaps, now)
        try:
            seq, gaps, first_seen, cordoned = await self._openings.run(opening)
        except IntegrityError:
            # Two first sessions of a new node raced on PostgreSQL's parallel store threads
            # (or two replicas): the row exists now, and the second attempt updates it.
            seq, gaps, first_seen, cordoned = await self._openings.run(opening)
        inventory_json, kubernetes_node_name = compact_inventory(hello.inventory)
        state = AgentState(
            node_id=hello.node_id,
            status=AgentStatus.CONNECTED,
            first_seen=first_seen,
            last_seen=now,
            agent_version=hello.agent_version,
            spiffe_id=hello.spiffe_id,
            capabilities=hello.capabilities,
            inventory_json=inventory_json,
            kubernetes_node_name=kubernetes_node_name,
            last_telemetry_seq=seq,
            telemetry_gap_samples=gaps,
            session_id=session.session_id,
            cordoned=cordoned,
            replica_address=self._address_of(self.replica_id),
            connected_at=now,
        )
        # Re-read after the await: another session for the node may have opened meanwhile.
        agent = self._agents.get(hello.node_id)
        if agent is not None and agent.session is not None:
            agent.session.close("superseded by a newer session of the same node")
        if agent is None:
            agent = _Agent(state, self._clock(), now.timestamp(), seq, gaps, session)
            self._agents[hello.node_id] = agent
            self._count(agent, None)
            self._publish_counts()
        else:
            agent.session = session
            agent.last_heard = self._clock()
            agent.last_seen = now.timestamp()
            agent.seq = seq
            agent.gaps = gaps
            self._set_state(agent, state)
        agent.replica = self.replica_id
        agent.session_key = session.session_id
        agent.inventory_stamp = (session.session_id, now)
        snapshot = agent.snapshot()
        self._notify(snapshot)
        if self._on_status_changed is not None:
            self._on_status_changed(snapshot, previous)
        return session, snapshot

    async def close_session(self, session: AgentSession, reason: str) -> None:
        """Marks the end of a session; the node becomes Suspect unless a newer session exists."""
        session.close(reason)
        agent = self._agents.get(session.node_id)
        if agent is None or agent.session is not session:
            return
        agent.session = None
        agent.replica = ""
        agent.last_heard = self._clock()
        await self._change_status(agent, AgentStatus.SUSPECT, leave_directory=True)

    def heard_from(self, node_id: str) -> None:
        """Anything received from a node proves it alive."""
        agent = self._agents.get(node_id)
        if agent is None:
            return
        agent.last_heard = self._clock()
        agent.last_seen = time.time()
        self._dirty_last_seen.add(node_id)
        if agent.state.status is AgentStatus.SUSPECT and agent.session is not None:
            self._spawn_write(self._change_status(agent, AgentStatus.CONNECTED))

    def record_telemetry(self, node_id: str, seq: int, gaps: int) -> None:
        """Keeps the in-memory view in step with what the telemetry hub persisted."""
        agent = self._agents.get(node_id)
        if agent is not None:
            agent.seq, agent.gaps = seq, gaps
            # The hub's write carried last_seen for this node; no need to write it again.
            self._dirty_last_seen.discard(node_id)

    # -- liveness -----------------------------------------------------------------------

    async def sweep(self) -> None:
        """Applies the liveness rules once."""
        now = self._clock()
        for index, agent in enumerate(list(self._agents.values()), 1):
            if index % _SWEEP_SLICE == 0:
                # Tens of thousands of nodes: let the sessions' messages through meanwhile.
                await asyncio.sleep(0)
            if agent.replica and agent.session is None:
                if not self._held_elsewhere(agent.replica):
                    await self._release_orphan(agent)
                continue
            silent = now - agent.last_heard
            status = agent.state.status
            if status is AgentStatus.CONNECTED and silent > self._suspect_after:
                log.warning(
                    "node silent for %.0f s", silent, extra={"node_id": agent.state.node_id}
                )
                await self._change_status(agent, AgentStatus.SUSPECT)
            elif status is AgentStatus.SUSPECT and silent > self._disconnect_after:
                if agent.session is not None:
                    agent.session.close("no message within the liveness grace period")
                    agent.session = None
                    agent.replica = ""
                await self._change_status(agent, AgentStatus.DISCONNECTED, leave_directory=True)

    async def persist_last_seen(self) -> None:
        """Writes the `last_seen` of every node heard from since the last call, in one batch."""
        if not self._dirty_last_seen:
            return
        values = [
            {"key": n, "last_seen": dt.datetime.fromtimestamp(self._agents[n].last_seen, dt.UTC)}
            for n in self._dirty_last_seen
            if n in self._agents
        ]
        self._dirty_last_seen.clear()
        statement = (
            update(AGENTS)
            .where(AGENTS.c.node_id == bindparam("key"))
            .values(last_seen=bindparam("last_seen"))
        )

        def write(db: Connection) -> None:
            db.execute(statement, values)

        await self._store.run_core(write)

    async def run_sweeper(self, interval_s: float, persist_every_s: float) -> None:
        """Liveness every `interval_s`; `last_seen` reaches the store every `persist_every_s`
        (it is informational: liveness itself is judged in memory)."""
        last_persist = self._clock()
        while True:
            await asyncio.sleep(interval_s)
            await self.sweep()
            if self._clock() - last_persist >= persist_every_s:
                last_persist = self._clock()
                await self.persist_last_seen()

    # -- watchers -----------------------------------------------------------------------

    async def watch(self, max_backlog: int = 10_000) -> AsyncIterator[AgentState]:
        """Yields every agent's current state, then every change, until cancelled."""
        queue: asyncio.Queue[AgentState | None] = asyncio.Queue(maxsize=max_backlog)
        self._watchers.add(queue)
        try:
            for state in self.agents():
                yield state
            while True:
                item = await queue.get()
                if item is None:
                    raise WatcherOverflow(f"watcher fell more than {max_backlog} changes behind")
                yield item
        finally:
            self._watchers.discard(queue)

    def _notify(self, state: AgentState) -> None:
        for queue in list(self._watchers):
            if queue.full():
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
            else:
                queue.put_nowait(state)

    # -- internals ----------------------------------------------------------------------

    def _set_state(self, agent: _Agent, state: AgentState) -> None:
        previous = agent.state.status
        agent.state = state
        if state.status is not previous:
            self._count(agent, previous)
            self._publish_counts()

    def _count(self, agent: _Agent, previous: AgentStatus | None) -> None:
        """Keeps the per-status counts and the unhealthy set in step with `agent.state`."""
        status = agent.state.status
        if previous is not None:
            self._counts[previous] -= 1
        self._counts[status] += 1
        if status is AgentStatus.CONNECTED:
            self._unhealthy.pop(agent.state.node_id, None)
        else:
            self._unhealthy[agent.state.node_id] = agent

    async def _change_status(
        self, agent: _Agent, status: AgentStatus, *, leave_directory: bool = False
    ) -> None:
        """Sets and writes a status; `leave_directory` also clears the directory entry. The
        write applies only while the directory still names the session this replica knew, so
        it never overwrites a newer holder's entry (then the row is re-read instead)."""
        session_id = agent.session.session_id if agent.session else ""
        previous = agent.state.status
        self._set_state(agent, replace(agent.state, status=status, session_id=session_id))
        node_id = agent.state.node_id
        log.info("node is now %s", status.value, extra={"node_id": node_id})
        changed = agent.snapshot()
        self._notify(changed)
        key = agent.session_key
        values: dict[str, object] = {"status": status.value}
        if leave_directory:
            values.update(replica_id="", session_id="", connected_at=None)
            agent.session_key = ""
        bus = self._bus

        def write(db: Connection) -> int:
            result = db.execute(
                update(AGENTS)
                .where(AGENTS.c.node_id == node_id, AGENTS.c.session_id == key)
                .values(**values)
            )
            if result.rowcount and bus is not None:
                bus.notify(db, AGENT_CHANNEL, node_id)
            return int(result.rowcount)

        def written(outcome: asyncio.Future[int]) -> None:
            if outcome.cancelled() or outcome.exception() is not None:
                return
            if outcome.result() == 0:
                if self._replicas is not None:
                    self._reload_soon({node_id})  # another replica holds it now: take its view
            elif self._on_status_changed is not None:
                self._on_status_changed(changed, previous)

        # Judged when the write ends, even if the caller (an ending session's handler) was
        # cancelled meanwhile: the write itself cannot be taken back.
        writing = asyncio.ensure_future(self._store.run_core(write))
        writing.add_done_callback(written)
        await asyncio.shield(writing)

    async def _release_orphan(self, agent: _Agent) -> None:
        """The directory names a holder this replica does not see alive: when the store agrees
        (its heartbeat row is stale or gone), the entry is cleared and the node gets the usual
        grace period from now on; otherwise (a replica just started, say) nothing changes."""
        assert self._replicas is not None
        node_id, key, holder = agent.state.node_id, agent.session_key, agent.replica
        horizon = _utcnow() - self._replicas.stale_after
        status = agent.state.status
        if status is AgentStatus.CONNECTED:
            status = AgentStatus.SUSPECT
        bus = self._bus

        def write(db: Connection) -> int:
            alive = select(REPLICAS.c.replica_id).where(
                REPLICAS.c.replica_id == holder, REPLICAS.c.heartbeat_at >= horizon
            )
            result = db.execute(
                update(AGENTS)
                .where(AGENTS.c.node_id == node_id, AGENTS.c.session_id == key, ~exists(alive))
                .values(status=status.value, replica_id="", session_id="", connected_at=None)
            )
            if result.rowcount and bus is not None:
                bus.notify(db, AGENT_CHANNEL, node_id)
            return int(result.rowcount)

        if await self._store.run_core(write) == 0:
            self._reload_soon({node_id})
            return
        log.info("replica %s holding the node is gone", holder, extra={"node_id": node_id})
        agent.replica = agent.session_key = ""
        agent.last_heard = self._clock()
        previous = agent.state.status
        if status is not previous:
            self._set_state(agent, replace(agent.state, status=status, session_id=""))
        self._notify(agent.snapshot())
        if status is not previous and self._on_status_changed is not None:
            self._on_status_changed(agent.snapshot(), previous)

    def _spawn_write(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("agent status write failed: %s", task.exception())

    # -- the directory across replicas ---------------------------------------------------------

    def _on_notice(self, _sender: str, node_id: str) -> None:
        self._reload_soon({node_id})

    def _reload_soon(self, node_ids: set[str] | None) -> None:
        """Re-reads the rows of `node_ids` (every row when None), coalescing bursts."""
        if node_ids is None:
            self._to_reload = {"*"}
        elif "*" not in self._to_reload:
            self._to_reload |= node_ids
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._reload_pending())

    async def _reload_pending(self) -> None:
        while self._to_reload:
            wanted, self._to_reload = self._to_reload, set()
            try:
                await self.reload(None if "*" in wanted else wanted)
            except Exception as exc:
                log.warning("cannot re-read the agent directory: %s", exc)
                return

    async def run_directory_refresher(self, interval_s: float = DIRECTORY_REFRESH_S) -> None:
        """Re-reads the whole directory now and then: the safety net under the bus."""
        while True:
            await asyncio.sleep(interval_s)
            await self.reload(None)

    async def reload(self, node_ids: set[str] | None) -> None:
        """Takes other replicas' view of the given nodes (all when None) from the store."""

        def read(db: Session) -> list[AgentRow]:
            query = select(AgentRow)
            if node_ids is not None:
                query = query.where(AgentRow.node_id.in_(sorted(node_ids)))
            return list(db.scalars(query))

        for row in await self._store.run(read):
            self._apply_row(row)

    def _apply_row(self, row: AgentRow) -> None:
        agent = self._agents.get(row.node_id)
        if agent is not None and agent.session is not None:
            if row.session_id == agent.session.session_id:
                return  # our own session: our memory is the truth
            if row.replica_id and row.replica_id != self.replica_id:
                # The node opened a newer session on another replica: ours is stale.
                agent.session.close(f"superseded by a newer session on replica {row.replica_id}")
                agent.session = None
            else:
                return  # a write of ours not yet visible, or an older row: keep ours
        held = self._held_elsewhere(row.replica_id)
        status = AgentStatus(row.status)
        stamp = (row.session_id, row.connected_at)
        if agent is not None and agent.inventory_stamp == stamp:
            # The directory is re-read every 30 s: re-encoding every node's inventory each time
            # would hold the event loop for long at tens of thousands of nodes.
            inventory_json = agent.state.inventory_json
            kubernetes_node_name = agent.state.kubernetes_node_name
        else:
            inventory_json, kubernetes_node_name = compact_inventory(row.inventory)
        state = AgentState(
            node_id=row.node_id,
            status=status,
            first_seen=row.first_seen,
            last_seen=row.last_seen,
            agent_version=row.agent_version,
            spiffe_id=row.spiffe_id,
            capabilities=tuple(row.capabilities),
            inventory_json=inventory_json,
            kubernetes_node_name=kubernetes_node_name,
            last_telemetry_seq=row.last_telemetry_seq,
            telemetry_gap_samples=row.telemetry_gap_samples,
            session_id=row.session_id if held else "",
            cordoned=row.cordoned,
            replica_address=self._address_of(row.replica_id) if held else "",
            connected_at=row.connected_at if held else None,
        )
        if agent is None:
            agent = _Agent(
                state,
                self._clock(),
                row.last_seen.timestamp(),
                row.last_telemetry_seq,
                row.telemetry_gap_samples,
            )
            self._agents[row.node_id] = agent
            self._count(agent, None)
            self._publish_counts()
        else:
            before = agent.snapshot()
            if held or agent.replica != row.replica_id:
                agent.last_heard = self._clock()
            agent.last_seen = max(agent.last_seen, row.last_seen.timestamp())
            agent.seq = max(agent.seq, row.last_telemetry_seq)
            agent.gaps = max(agent.gaps, row.telemetry_gap_samples)
            self._set_state(agent, state)
            if agent.snapshot() == before and agent.replica == row.replica_id:
                return
        agent.replica = row.replica_id
        agent.session_key = row.session_id
        agent.inventory_stamp = stamp
        self._notify(agent.snapshot())

    def _publish_counts(self) -> None:
        if self._on_status_counts is not None:
            self._on_status_counts(dict(self._counts))
