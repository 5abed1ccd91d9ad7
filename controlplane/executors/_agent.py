"""The agent executor: carries out a node-scoped plan step on one node through the command
ledger, under a command id derived from (plan, step, node, do/undo), so running it again after
a restart attaches to the same command instead of sending a second one."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from controlplane.fleet import CommandLedger, CommandResult


def command_id_for(plan_id: str, step_index: int, node_id: str, kind: str) -> str:
    """Deterministic, ≤ 64 characters, readable enough to find in logs."""
    node = hashlib.sha256(node_id.encode()).hexdigest()[:10]
    return f"{plan_id}-s{step_index}-{kind}-{node}"


class AgentExecutor:
    def __init__(
        self,
        ledger: CommandLedger,
        on_cordon_changed: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._on_cordon_changed = on_cordon_changed

    async def withdraw(self, *, plan_id: str, step_index: int, node_id: str) -> bool:
        """Withdraws the step's command for `node_id` if no agent has received it yet."""
        return await self._ledger.withdraw(command_id_for(plan_id, step_index, node_id, "do"))

    async def run(
        self,
        *,
        plan_id: str,
        step_index: int,
        node_id: str,
        action: str,
        parameters: dict[str, Any],
        deadline: dt.datetime,
        undo: bool = False,
    ) -> CommandResult:
        command_id = command_id_for(plan_id, step_index, node_id, "undo" if undo else "do")
        result = await self._ledger.execute(
            node_id,
            action,
            parameters,
            command_id=command_id,
            deadline=deadline,
            plan_id=plan_id,
        )
        if result.succeeded and action in ("cordon", "uncordon") and self._on_cordon_changed:
            await self._on_cordon_changed(node_id, action == "cordon")
        return result
