"""The agent executor: carries out a node-scoped plan step on one node through the command
ledger, under a command id derived from (plan, step, node, do/undo), so running it again after
a restart attaches to the same command instead of sending a second one."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from controlplane.executors._node_actions import NODE_ACTIONS, power_limit_gpus
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

OWN_CHANGE_TTL_S = 60.0
"""How long a power limit this executor set stands in for telemetry that has not shown it yet."""

PowerLimits = Callable[[str], Mapping[int, int] | None]
"""A node's GPU power limits (GPU index to milliwatts) from its newest telemetry sample, or None
when it has sent none."""


def watts_text(milliwatts: int) -> str:
    """A power limit as recorded state shows it: watts, to the milliwatt, no trailing zeros."""
    return f"{milliwatts / 1000:.3f}".rstrip("0").rstrip(".")


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
        power_limits: PowerLimits | None = None,
        fresh: Callable[[Collection[str]], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._node_known = node_known
        self._is_cordoned = is_cordoned
        self._on_cordon_changed = on_cordon_changed
        self._power_limits = power_limits
        self._fresh = fresh
        # node -> (when, GPU index -> milliwatts) of the power limits the node's last
        # successful set_gpu_power_limit run set, until its telemetry shows them.
        self._set_by_runs: dict[str, tuple[float, dict[int, int]]] = {}

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

    async def observe(
        self, action: str, parameters: Mapping[str, Any], target: Target
    ) -> dict[str, str]:
        """`cordoned` (from the registry) for cordon and uncordon; for set_gpu_power_limit
        `gpu.<index>.power_limit_watts` of the GPUs the step sets, from the node's newest
        telemetry sample; nothing for the other actions."""
        node_id = target.node_id
        if action in ("cordon", "uncordon"):
            return {"cordoned": "true" if self._is_cordoned(node_id) else "false"}
        if action != "set_gpu_power_limit" or self._power_limits is None:
            return {}
        if self._fresh is not None:
            await self._fresh((node_id,))
        limits = self._power_limits(node_id)
        if limits is None:
            raise LookupError(
                f"node {node_id} has sent no telemetry yet: its GPU power limits are unknown"
            )
        observed = dict(limits)
        own = self._set_by_runs.get(node_id)
        if own is not None:
            when, set_limits = own
            shown = all(observed.get(index) == mw for index, mw in set_limits.items())
            if shown or time.monotonic() - when > OWN_CHANGE_TTL_S:
                del self._set_by_runs[node_id]
            else:
                # Telemetry lags the change by up to a sampling interval: until it shows it,
                # the value the agent reported setting is the newer truth.
                observed.update(set_limits)
        wanted = power_limit_gpus(dict(parameters))
        return {
            f"gpu.{index}.power_limit_watts": watts_text(mw)
            for index, mw in sorted(observed.items())
            if wanted is None or index in wanted
        }

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
        if result.succeeded and run.action == "set_gpu_power_limit":
            self._remember_power_limits(node_id, result.output)
        return RunOutcome(
            result.succeeded,
            result.outcome,
            result.message,
            dict(result.output),
            reference=result.command_id,
        )

    def _remember_power_limits(self, node_id: str, output: Mapping[str, Any]) -> None:
        set_limits: dict[int, int] = {}
        for gpu in output.get("gpus", []):
            try:
                set_limits[int(gpu["index"])] = round(float(gpu["watts"]) * 1000)
            except (KeyError, TypeError, ValueError):
                continue
        if set_limits:
            self._set_by_runs[node_id] = (time.monotonic(), set_limits)

    def undo(
        self, action: str, parameters: Mapping[str, Any], output: Mapping[str, Any]
    ) -> Undo | None:
        inverse = NODE_ACTIONS[action].inverse(dict(parameters), dict(output))
        return None if inverse is None else Undo(*inverse)
