"""The command ledger: commands to agents, written before they are sent, delivered at least
once (re-sent on every new session until acknowledged), and finished by the agent's result.

`CommandLedger.send` is the internal API the plan executors use: it returns the result, or
raises `CommandTimeout` when none came before the deadline.

Across replicas the ledger is the only channel: a command for a node whose session another
replica holds is stored PENDING with a notification on the bus; the holder wakes, reads the
node's pending commands in creation order and sends them. The holder stores the result with a
notification; the replica awaiting it wakes and reads it. Notifications only wake: a slow poll
of the ledger covers any that were lost.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session

from controlplane.fleet._model import AgentSession, CommandOut
from controlplane.store import COMMANDS, Bus, CommandRow, Store, WriteBatcher, fit

log = logging.getLogger(__name__)

COMMAND_CHANNEL = "sentinel_command"
RESULT_CHANNEL = "sentinel_result"
# With replicas, how often a waiter re-reads its command and a holder looks for pending ones,
# in case a notification was lost.
SAFETY_POLL_S = 5.0


class CommandState(enum.StrEnum):
    """Where a command is in its life: stored, sent, acknowledged, finished or expired."""

    PENDING = "PENDING"  # stored, not yet on a session
    SENT = "SENT"  # written to a session at least once
    ACKED = "ACKED"  # the agent has it
    FINISHED = "FINISHED"  # the agent sent its result
    EXPIRED = "EXPIRED"  # the deadline passed without a result


class CommandTimeout(Exception):
    """No result arrived before the command's deadline."""


class UnknownCommand(Exception):
    """An ack or result names a command this node was never sent."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a node reported for one command (or why it never ran)."""

    command_id: str
    node_id: str
    action: str
    outcome: str  # SUCCEEDED, FAILED, UNSUPPORTED, EXPIRED, CANCELLED, INVALID_ARGUMENT
    message: str = ""
    output: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.outcome == "SUCCEEDED"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_command_id() -> str:
    # Time-ordered, so ids sort in creation order in the store and in logs.
    return f"cmd-{time.time_ns():x}-{uuid.uuid4().hex[:12]}"


_OPEN_STATES = (CommandState.PENDING.value, CommandState.SENT.value, CommandState.ACKED.value)


def _unfinished_commands(db: Session, node_ids: list[str]) -> list[list[CommandOut]]:
    """For each node (sessions opening together), its unfinished and unexpired commands in
    creation order, marked sent once more; the expired ones are marked EXPIRED instead. One
    query for all the nodes."""
    now = _utcnow()
    rows = db.scalars(
        select(CommandRow)
        .where(CommandRow.node_id.in_(sorted(set(node_ids))), CommandRow.state.in_(_OPEN_STATES))
        .order_by(CommandRow.created_at, CommandRow.command_id)
    )
    out: dict[str, list[CommandOut]] = {node_id: [] for node_id in node_ids}
    for row in rows:
        if row.deadline <= now:
            row.state = CommandState.EXPIRED.value
            row.finished_at = now
            continue
        row.deliveries += 1
        row.sent_at = row.sent_at or now
        if row.state == CommandState.PENDING.value:
            row.state = CommandState.SENT.value
        out[row.node_id].append(
            CommandOut(row.command_id, row.plan_id, row.action, row.parameters, row.deadline)
        )
    return [out[node_id] for node_id in node_ids]


class CommandLedger:
    """Stores commands before they are sent, delivers them in order per node, and hands results
    back."""

    def __init__(
        self,
        store: Store,
        session_for: Callable[[str], AgentSession | None],
        on_finished: Callable[[CommandResult, float], None] | None = None,
        bus: Bus | None = None,
    ) -> None:
        self._store = store
        # The unfinished commands of sessions opening together are read together.
        self._redeliveries = WriteBatcher(store, _unfinished_commands)
        self._session_for = session_for
        self._on_finished = on_finished
        self._bus = bus if bus is not None and bus.enabled else None
        self._waiters: dict[str, asyncio.Future[CommandResult]] = {}
        self._node_locks: dict[str, asyncio.Lock] = {}
        self._sent_at: dict[str, float] = {}
        self._wakeups: set[asyncio.Task[object]] = set()
        if self._bus is not None:
            self._bus.subscribe(COMMAND_CHANNEL, lambda _s, node_id: self._wake(node_id))
            self._bus.subscribe(
                RESULT_CHANNEL, lambda _s, command_id: self._result_noted(command_id)
            )

    async def send(
        self,
        node_id: str,
        action: str,
        parameters: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        plan_id: str = "",
        command_id: str | None = None,
    ) -> CommandResult:
        """Stores a command, delivers it when the node has a session, awaits its result;
        raises `CommandTimeout` when none came before the deadline."""
        result = await self.execute(
            node_id,
            action,
            parameters,
            command_id=command_id or new_command_id(),
            deadline=_utcnow() + dt.timedelta(seconds=timeout),
            plan_id=plan_id,
        )
        if result.outcome == "EXPIRED":
            raise CommandTimeout(f"{action} on {node_id}: no result within {timeout:g} s")
        return result

    async def execute(
        self,
        node_id: str,
        action: str,
        parameters: dict[str, Any] | None,
        *,
        command_id: str,
        deadline: dt.datetime,
        plan_id: str = "",
    ) -> CommandResult:
        """Idempotent by `command_id`: the first call stores and sends the command; a later call
        (after a control plane restart, say) attaches to it and returns its stored result, or
        waits for it. A command without a result by `deadline` ends EXPIRED."""
        command = CommandOut(command_id, plan_id, action, dict(parameters or {}), deadline)
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._waiters[command_id] = future
        try:
            # Per node, commands reach the session in the order they were given: the store
            # may run transactions side by side (PostgreSQL), so the insert-then-send section
            # is taken in turn (asyncio locks are fair).
            async with self._node_locks.setdefault(node_id, asyncio.Lock()):
                session = self._session_for(node_id)
                # One transaction stores the command (or finds it), marked SENT when a session
                # is open; it goes on the wire only after that commit (never lost).
                stored = await self._store.run_core(
                    lambda db: self._insert_or_find(db, node_id, command, session is not None)
                )
                if isinstance(stored, CommandResult):
                    return stored
                send_now, deadline = stored
                if send_now and session is not None:
                    self._sent_at.setdefault(command_id, time.monotonic())
                    session.send(
                        CommandOut(command_id, plan_id, action, command.parameters, deadline)
                    )
            return await self._await_result(command_id, future, deadline)
        except TimeoutError:
            await self._expire(command_id)
            if future.done():  # the result raced the deadline; it wins
                return future.result()
            return CommandResult(
                command_id, node_id, action, "EXPIRED", "no result before the command's deadline"
            )
        finally:
            self._waiters.pop(command_id, None)
            self._sent_at.pop(command_id, None)

    async def _await_result(
        self, command_id: str, future: asyncio.Future[CommandResult], deadline: dt.datetime
    ) -> CommandResult:
        """The result when it comes (TimeoutError at the deadline). With replicas, the ledger
        is re-read now and then, in case the holder's notification was lost."""
        while True:
            remaining = (deadline - _utcnow()).total_seconds()
            if remaining <= 0:
                raise TimeoutError
            wait = remaining if self._bus is None else min(remaining, SAFETY_POLL_S)
            try:
                return await asyncio.wait_for(asyncio.shield(future), wait)
            except TimeoutError:
                if self._bus is None:
                    raise
            stored = await self.get(command_id)
            if stored is not None and stored[1] is not None:
                return stored[1]

    def _insert_or_find(
        self, db: Connection, node_id: str, command: CommandOut, sending: bool
    ) -> tuple[bool, dt.datetime] | CommandResult:
        """(send it now?, its deadline) while open — the stored deadline wins over a new one,
        so re-attaching never extends it — or its result once it has finished."""
        row = db.execute(
            select(
                COMMANDS.c.deadline,
                COMMANDS.c.node_id,
                COMMANDS.c.action,
                COMMANDS.c.state,
                COMMANDS.c.outcome,
                COMMANDS.c.message,
                COMMANDS.c.output,
            ).where(COMMANDS.c.command_id == command.command_id)
        ).first()
        if row is None:
            self._insert(db, node_id, command, sending)
            if not sending and self._bus is not None:
                # Another replica may hold the node's session: wake it.
                self._bus.notify(db, COMMAND_CHANNEL, node_id)
            return True, command.deadline
        if row.node_id != node_id:
            raise ValueError(f"command id {command.command_id} belongs to node {row.node_id}")
        if row.state == CommandState.FINISHED.value:
            return CommandResult(
                command.command_id, node_id, row.action, row.outcome, row.message, row.output
            )
        if row.state == CommandState.EXPIRED.value:
            if row.outcome == "CANCELLED":
                return CommandResult(
                    command.command_id, node_id, row.action, "CANCELLED", row.message
                )
            return CommandResult(
                command.command_id,
                node_id,
                row.action,
                "EXPIRED",
                "no result before the command's deadline",
            )
        if row.state == CommandState.PENDING.value and sending:
            # Stored while the node was away and the node is back: the agent drops a duplicate
            # by id, so sending it again costs nothing and closes any race with redelivery.
            db.execute(
                update(COMMANDS)
                .where(COMMANDS.c.command_id == command.command_id)
                .values(
                    state=CommandState.SENT.value,
                    sent_at=_utcnow(),
                    deliveries=COMMANDS.c.deliveries + 1,
                )
            )
            return True, row.deadline
        return False, row.deadline

    @staticmethod
    def _insert(db: Connection, node_id: str, command: CommandOut, sending: bool) -> None:
        now = _utcnow()
        db.execute(
            insert(COMMANDS).values(
                command_id=command.command_id,
                node_id=node_id,
                plan_id=command.plan_id,
                action=command.action,
                parameters=command.parameters,
                state=(CommandState.SENT if sending else CommandState.PENDING).value,
                created_at=now,
                deadline=command.deadline,
                sent_at=now if sending else None,
                deliveries=1 if sending else 0,
                outcome="",
                message="",
                output={},
            )
        )

    async def withdraw(self, command_id: str) -> bool:
        """Withdraws a command no agent has received yet (a cancelled plan): it will never be
        delivered, and whoever waits for it gets a CANCELLED result. False when it was already
        on its way (or done): then its result must be awaited as usual."""

        def write(db: Connection) -> bool:
            result = db.execute(
                update(COMMANDS)
                .where(
                    COMMANDS.c.command_id == command_id,
                    COMMANDS.c.state == CommandState.PENDING.value,
                )
                .values(
                    state=CommandState.EXPIRED.value,
                    finished_at=_utcnow(),
                    outcome="CANCELLED",
                    message="withdrawn before delivery",
                )
            )
            return bool(result.rowcount == 1)

        withdrawn = await self._store.run_core(write)
        future = self._waiters.get(command_id)
        if withdrawn and future is not None and not future.done():
            future.set_result(
                CommandResult(command_id, "", "", "CANCELLED", "withdrawn before delivery")
            )
        return withdrawn

    async def redeliver(self, session: AgentSession) -> int:
        """Re-sends, in creation order, every unfinished and unexpired command of the node."""
        node_id = session.node_id
        commands = await self._redeliveries.run(node_id)
        if commands:
            log.info("sending %d unfinished command(s)", len(commands), extra={"node_id": node_id})
        sent = time.monotonic()
        for command in commands:
            self._sent_at.setdefault(command.command_id, sent)
            session.send(command)
        return len(commands)

    async def record_ack(self, node_id: str, command_id: str) -> None:
        unacked = (CommandState.PENDING.value, CommandState.SENT.value)

        def write(db: Connection) -> None:
            owner = db.scalar(select(COMMANDS.c.node_id).where(COMMANDS.c.command_id == command_id))
            if owner != node_id:
                raise UnknownCommand(f"{node_id} acknowledged unknown command {command_id!r}")
            db.execute(
                update(COMMANDS)
                .where(COMMANDS.c.command_id == command_id, COMMANDS.c.state.in_(unacked))
                .values(state=CommandState.ACKED.value, acked_at=_utcnow())
            )

        await self._store.run_core(write)

    async def record_result(self, node_id: str, result: CommandResult) -> None:
        """Stores the agent's result (the first one wins) and wakes the sender."""

        def write(db: Connection) -> CommandResult | None:
            row = db.execute(
                select(COMMANDS.c.node_id, COMMANDS.c.action, COMMANDS.c.state).where(
                    COMMANDS.c.command_id == result.command_id
                )
            ).first()
            if row is None or row.node_id != node_id:
                raise UnknownCommand(
                    f"{node_id} sent a result for unknown command {result.command_id!r}"
                )
            if row.state == CommandState.FINISHED.value:
                return None  # a re-sent result after a reconnect: already recorded
            # Conditional, so of two copies of a result written at once only one counts.
            written = db.execute(
                update(COMMANDS)
                .where(
                    COMMANDS.c.command_id == result.command_id,
                    COMMANDS.c.state != CommandState.FINISHED.value,
                )
                .values(
                    state=CommandState.FINISHED.value,
                    finished_at=_utcnow(),
                    outcome=fit(result.outcome, 32),
                    message=fit(result.message),
                    output=result.output,
                )
            )
            if written.rowcount != 1:
                return None
            if self._bus is not None and result.command_id not in self._waiters:
                # Whoever awaits it is on another replica (or gone: the ledger keeps it).
                self._bus.notify(db, RESULT_CHANNEL, result.command_id)
            return CommandResult(
                result.command_id,
                node_id,
                row.action,
                result.outcome,
                result.message,
                result.output,
            )

        stored = await self._store.run_core(write)
        if stored is None:
            return
        started = self._sent_at.get(result.command_id)
        if self._on_finished is not None:
            self._on_finished(stored, time.monotonic() - started if started else -1.0)
        future = self._waiters.get(result.command_id)
        if future is not None and not future.done():
            future.set_result(stored)

    # -- across replicas -------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._wakeups.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[object]) -> None:
        self._wakeups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cross-replica command delivery failed: %s", task.exception())

    def _wake(self, node_id: str) -> None:
        if self._session_for(node_id) is not None:
            self._spawn(self.deliver_pending(node_id))

    def _result_noted(self, command_id: str) -> None:
        future = self._waiters.get(command_id)
        if future is not None and not future.done():
            self._spawn(self._fetch_result(command_id))

    async def _fetch_result(self, command_id: str) -> None:
        stored = await self.get(command_id)
        future = self._waiters.get(command_id)
        if stored is not None and stored[1] is not None and future and not future.done():
            future.set_result(stored[1])

    async def deliver_pending(self, node_id: str) -> int:
        """Sends, in creation order, the node's commands stored by other replicas and not yet
        on any session, when this replica holds the node's session."""
        async with self._node_locks.setdefault(node_id, asyncio.Lock()):
            session = self._session_for(node_id)
            if session is None:
                return 0
            now = _utcnow()

            def claim(db: Connection) -> list[CommandOut]:
                rows = db.execute(
                    select(
                        COMMANDS.c.command_id,
                        COMMANDS.c.plan_id,
                        COMMANDS.c.action,
                        COMMANDS.c.parameters,
                        COMMANDS.c.deadline,
                    )
                    .where(
                        COMMANDS.c.node_id == node_id,
                        COMMANDS.c.state == CommandState.PENDING.value,
                        COMMANDS.c.deadline > now,
                    )
                    .order_by(COMMANDS.c.created_at, COMMANDS.c.command_id)
                ).all()
                out = []
                for row in rows:
                    # Conditional: a withdraw or another replica's claim may have come first.
                    claimed = db.execute(
                        update(COMMANDS)
                        .where(
                            COMMANDS.c.command_id == row.command_id,
                            COMMANDS.c.state == CommandState.PENDING.value,
                        )
                        .values(
                            state=CommandState.SENT.value,
                            sent_at=now,
                            deliveries=COMMANDS.c.deliveries + 1,
                        )
                    )
                    if claimed.rowcount == 1:
                        out.append(
                            CommandOut(
                                row.command_id,
                                row.plan_id,
                                row.action,
                                row.parameters,
                                row.deadline,
                            )
                        )
                return out

            commands = await self._store.run_core(claim)
            sent = time.monotonic()
            for command in commands:
                self._sent_at.setdefault(command.command_id, sent)
                session.send(command)
            if commands:
                log.info(
                    "sending %d command(s) stored by another replica",
                    len(commands),
                    extra={"node_id": node_id},
                )
            return len(commands)

    async def run_pending_sweeper(self, interval_s: float = SAFETY_POLL_S) -> None:
        """With replicas: now and then, delivers pending commands of the nodes held here whose
        notification was lost (a supervised task)."""
        if self._bus is None:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(interval_s)
            for node_id in await self._store.run_core(self._pending_nodes):
                if self._session_for(node_id) is not None:
                    await self.deliver_pending(node_id)

    @staticmethod
    def _pending_nodes(db: Connection) -> list[str]:
        now = _utcnow()
        return list(
            db.scalars(
                select(COMMANDS.c.node_id)
                .where(
                    COMMANDS.c.state == CommandState.PENDING.value,
                    COMMANDS.c.deadline > now,
                )
                .distinct()
            )
        )

    async def get(self, command_id: str) -> tuple[CommandState, CommandResult | None] | None:
        """The stored state of a command and its result when finished."""

        def read(db: Session) -> tuple[CommandState, CommandResult | None] | None:
            row = db.get(CommandRow, command_id)
            if row is None:
                return None
            result = None
            if row.state == CommandState.FINISHED.value:
                result = CommandResult(
                    row.command_id, row.node_id, row.action, row.outcome, row.message, row.output
                )
            return CommandState(row.state), result

        return await self._store.run(read)

    async def _expire(self, command_id: str) -> None:
        open_states = [
            CommandState.PENDING.value,
            CommandState.SENT.value,
            CommandState.ACKED.value,
        ]

        def write(db: Session) -> None:
            db.execute(
                update(CommandRow)
                .where(CommandRow.command_id == command_id, CommandRow.state.in_(open_states))
                .values(state=CommandState.EXPIRED.value, finished_at=_utcnow())
            )

        await self._store.run(write)
