"""The fleet registry: which agents exist, which session each holds, and how alive they are.

Liveness is judged from what the control plane hears: a node whose session ends or falls silent
for `suspect_after` becomes Suspect; Suspect for `disconnect_after` makes it Disconnected.
Status changes are written through to the store at once; `last_seen` is written in batches.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controlplane.fleet._model import AgentSession, AgentState, AgentStatus, HelloInfo
from controlplane.store import AGENTS, AgentRow, Store

log = logging.getLogger(__name__)


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

    def snapshot(self) -> AgentState:
        return replace(
            self.state,
            last_seen=dt.datetime.fromtimestamp(self.last_seen, dt.UTC),
            last_telemetry_seq=self.seq,
            telemetry_gap_samples=self.gaps,
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
    ) -> None:
        self._store = store
        self._suspect_after = suspect_after_s
        self._disconnect_after = disconnect_after_s
        self._on_status_counts = on_status_counts
        self._clock = clock
        self._agents: dict[str, _Agent] = {}
        self._counts: dict[AgentStatus, int] = dict.fromkeys(AgentStatus, 0)
        self._dirty_last_seen: set[str] = set()
        self._watchers: set[asyncio.Queue[AgentState | None]] = set()

    # -- loading and reading --------------------------------------------------------------

    async def load(self) -> None:
        """Reads the registry from the store. Nodes that were connected when the control plane
        stopped become Suspect: they get the full grace period to come back."""

        def read(session: Session) -> list[AgentRow]:
            rows = list(session.scalars(select(AgentRow)))
            session.execute(
                update(AgentRow)
                .where(AgentRow.status == AgentStatus.CONNECTED.value)
                .values(status=AgentStatus.SUSPECT.value)
            )
            return rows

        now = self._clock()
        for row in await self._store.run(read):
            status = AgentStatus(row.status)
            if status is AgentStatus.CONNECTED:
                status = AgentStatus.SUSPECT
            state = AgentState(
                node_id=row.node_id,
                status=status,
                first_seen=row.first_seen,
                last_seen=row.last_seen,
                agent_version=row.agent_version,
                spiffe_id=row.spiffe_id,
                capabilities=tuple(row.capabilities),
                inventory=row.inventory,
                last_telemetry_seq=row.last_telemetry_seq,
                telemetry_gap_samples=row.telemetry_gap_samples,
                cordoned=row.cordoned,
            )
            self._agents[row.node_id] = _Agent(
                state,
                last_heard=now,
                last_seen=row.last_seen.timestamp(),
                seq=row.last_telemetry_seq,
                gaps=row.telemetry_gap_samples,
            )
            self._counts[status] += 1
        self._publish_counts()

    def get(self, node_id: str) -> AgentState | None:
        agent = self._agents.get(node_id)
        return agent.snapshot() if agent else None

    def agents(self, status: AgentStatus | None = None) -> list[AgentState]:
        return sorted(
            (a.snapshot() for a in self._agents.values() if status in (None, a.state.status)),
            key=lambda s: s.node_id,
        )

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
            if (agent.state.inventory.get("host") or {}).get("kubernetesNodeName") == name
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

        def write(db: Session) -> None:
            db.execute(
                update(AgentRow).where(AgentRow.node_id == node_id).values(cordoned=cordoned)
            )

        await self._store.run(write)

    def session_for(self, node_id: str) -> AgentSession | None:
        agent = self._agents.get(node_id)
        return agent.session if agent else None

    def sessions(self) -> list[AgentSession]:
        return [a.session for a in self._agents.values() if a.session is not None]

    # -- sessions -----------------------------------------------------------------------

    async def open_session(self, hello: HelloInfo) -> tuple[AgentSession, AgentState]:
        """Registers a new session for `hello.node_id`, superseding an older one."""
        now = _utcnow()
        session = AgentSession(session_id=uuid.uuid4().hex, node_id=hello.node_id)
        agent = self._agents.get(hello.node_id)
        seq = agent.seq if agent else 0
        claimed = max(hello.next_telemetry_seq - 1, 0)
        if seq > claimed:
            # The agent never produced the samples we hold: its state directory was reset.
            # Trust its numbering from here, or every new sample would be dropped as a duplicate.
            log.warning(
                "agent telemetry seq restarted (held %d, agent's next is %d): state was reset",
                seq,
                hello.next_telemetry_seq,
                extra={"node_id": hello.node_id},
            )
            seq = max((hello.oldest_unacked_seq or hello.next_telemetry_seq) - 1, 0)
        state = AgentState(
            node_id=hello.node_id,
            status=AgentStatus.CONNECTED,
            first_seen=agent.state.first_seen if agent else now,
            last_seen=now,
            agent_version=hello.agent_version,
            spiffe_id=hello.spiffe_id,
            capabilities=hello.capabilities,
            inventory=hello.inventory,
            last_telemetry_seq=seq,
            telemetry_gap_samples=agent.gaps if agent else 0,
            session_id=session.session_id,
            cordoned=agent.state.cordoned if agent else False,
        )

        def upsert(db: Session) -> None:
            row = db.get(AgentRow, hello.node_id)
            if row is None:
                row = AgentRow(node_id=hello.node_id, first_seen=state.first_seen)
                db.add(row)
            row.status = state.status.value
            row.last_seen = now
            row.agent_version = state.agent_version
            row.spiffe_id = state.spiffe_id
            row.capabilities = list(state.capabilities)
            row.inventory = state.inventory
            row.last_telemetry_seq = state.last_telemetry_seq
            row.telemetry_gap_samples = state.telemetry_gap_samples

        try:
            await self._store.run(upsert)
        except IntegrityError:
            # Two first sessions of a new node raced on PostgreSQL's parallel store threads:
            # the row exists now, and the second attempt updates it.
            await self._store.run(upsert)
        # Re-read after the await: another session for the node may have opened meanwhile.
        agent = self._agents.get(hello.node_id)
        if agent is not None and agent.session is not None:
            agent.session.close("superseded by a newer session of the same node")
        if agent is None:
            agent = _Agent(state, self._clock(), now.timestamp(), seq, 0, session)
            self._agents[hello.node_id] = agent
            self._counts[state.status] += 1
            self._publish_counts()
        else:
            agent.session = session
            agent.last_heard = self._clock()
            agent.last_seen = now.timestamp()
            agent.seq = seq
            self._set_state(agent, state)
        snapshot = agent.snapshot()
        self._notify(snapshot)
        return session, snapshot

    async def close_session(self, session: AgentSession, reason: str) -> None:
        """Marks the end of a session; the node becomes Suspect unless a newer session exists."""
        session.close(reason)
        agent = self._agents.get(session.node_id)
        if agent is None or agent.session is not session:
            return
        agent.session = None
        agent.last_heard = self._clock()
        await self._change_status(agent, AgentStatus.SUSPECT)

    def heard_from(self, node_id: str) -> None:
        """Anything received from a node proves it alive."""
        agent = self._agents.get(node_id)
        if agent is None:
            return
        agent.last_heard = self._clock()
        agent.last_seen = time.time()
        self._dirty_last_seen.add(node_id)
        if agent.state.status is AgentStatus.SUSPECT and agent.session is not None:
            self._set_state(agent, replace(agent.state, status=AgentStatus.CONNECTED))
            self._notify(agent.snapshot())

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
        for agent in list(self._agents.values()):
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
                await self._change_status(agent, AgentStatus.DISCONNECTED)

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
        if state.status is not agent.state.status:
            self._counts[agent.state.status] -= 1
            self._counts[state.status] += 1
            self._publish_counts()
        agent.state = state

    async def _change_status(self, agent: _Agent, status: AgentStatus) -> None:
        session_id = agent.session.session_id if agent.session else ""
        self._set_state(agent, replace(agent.state, status=status, session_id=session_id))
        node_id = agent.state.node_id
        log.info("node is now %s", status.value, extra={"node_id": node_id})
        self._notify(agent.snapshot())

        def write(db: Session) -> None:
            db.execute(
                update(AgentRow).where(AgentRow.node_id == node_id).values(status=status.value)
            )

        await self._store.run(write)

    def _publish_counts(self) -> None:
        if self._on_status_counts is not None:
            self._on_status_counts(dict(self._counts))
