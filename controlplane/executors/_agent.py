"""The agent executor: carries out a node-scoped plan step on one node through the command
ledger, under a command id derived from (plan, step, node, do/undo), so running it again after
a restart attaches to the same command instead of sending a second one."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from controlplane.executors._node_actions import NODE_ACTIONS
from controlplane.executors._protocol import (
    DryRun,
    Problems,
    RunOutcome,
    StepRun,
    Target,
    TargetKind,
    Undo,
)
from controlplane.fleet import CommandLedger

NODE_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
"""What a node id may look like (the agent's certificate name obeys the same rule)."""

_TRACER = trace.get_tracer(__name__)


def command_id_for(plan_id: str, step_index: int, node_id: str, kind: str) -> str:
    """Deterministic, ≤ 64 characters, readable enough to find in logs."""
    node = hashlib.sha256(node_id.encode()).hexdigest()[:10]
    return f"{plan_id}-s{step_index}-{kind}-{node}"


def _command_id(run: StepRun) -> str:
    return command_id_for(
        run.plan_id, run.step_index, run.target.node_id, "undo" if run.undo else "do"
    )


class AgentExecutor:
    """Runs node actions on nodes through their agents' command ledger."""

    kind = TargetKind.NODE
    actions = frozenset(NODE_ACTIONS)

    def __init__(
        self,
        ledger: CommandLedger,
        *,
        node_known: Callable[[str], bool],
        is_cordoned: Callable[[str], bool],
        on_cordon_changed: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._node_known = node_known
        self._is_cordoned = is_cordoned
        self._on_cordon_changed = on_cordon_changed

    def check_parameters(self, action: str, parameters: Mapping[str, Any]) -> Problems:
        return NODE_ACTIONS[action].check(dict(parameters))

    def check_target(self, action: str, target: Target) -> Problems:
        if not target.node_id:
            return [("", f"{action} acts on nodes: set node_id")]
        if not NODE_ID.match(target.node_id):
            return [("node_id", f"not a node id: {target.node_id!r}")]
        if not self._node_known(target.node_id):
            return [("node_id", f"no agent {target.node_id!r} has ever registered")]
        return []

    def preview(self, action: str, parameters: Mapping[str, Any], target: Target) -> str:
        shown = " ".join(f"{name}={parameters[name]!r}" for name in sorted(parameters))
        return f"{action} on {target.node_id} {shown}".rstrip()

    async def placement(self, target: Target, deadline: dt.datetime) -> list[str]:
        """A node target is its own agent."""
        return []

    async def dry_run(self, run: StepRun) -> DryRun:
        """Agents have no dry run: what a node action would do is its preview's summary."""
        return DryRun()

    async def withdraw(self, run: StepRun) -> bool:
        """Withdraws the step's command for the node if no agent has received it yet."""
        return await self._ledger.withdraw(_command_id(run))

    async def run(self, run: StepRun) -> RunOutcome:
        """Sends the run's command and waits for its result: one `command` span per round trip
        (send, the agent's execution, its result), including attaching to one already sent."""
        with _TRACER.start_as_current_span(
            "command",
            attributes={
                "sentinel.plan.id": run.plan_id,
                "sentinel.step.index": run.step_index,
                "sentinel.node.id": run.target.node_id,
                "sentinel.command.id": _command_id(run),
                "sentinel.command.action": run.action,
                "sentinel.command.undo": run.undo,
            },
        ) as span:
            outcome = await self._run(run)
            span.set_attribute("sentinel.command.outcome", outcome.outcome)
            if not outcome.succeeded:
                span.set_status(Status(StatusCode.ERROR, f"{outcome.outcome}: {outcome.message}"))
            return outcome

    async def _run(self, run: StepRun) -> RunOutcome:
        node_id = run.target.node_id
        if (
            not run.undo
            and not NODE_ACTIONS[run.action].allowed_on_cordoned
            and self._is_cordoned(node_id)
        ):
            return RunOutcome(
                False, "CORDONED", "the node is cordoned; uncordon it before new work"
            )
        result = await self._ledger.execute(
            node_id,
            run.action,
            dict(run.parameters),
            command_id=_command_id(run),
            deadline=run.deadline,
            plan_id=run.plan_id,
        )
        if result.succeeded and run.action in ("cordon", "uncordon") and self._on_cordon_changed:
            await self._on_cordon_changed(node_id, run.action == "cordon")
        return RunOutcome(
            result.succeeded,
            result.outcome,
            result.message,
            dict(result.output),
            reference=result.command_id,
        )

    def undo(
        self, action: str, parameters: Mapping[str, Any], output: Mapping[str, Any]
    ) -> Undo | None:
        inverse = NODE_ACTIONS[action].inverse(dict(parameters), dict(output))
        return None if inverse is None else Undo(*inverse)
