"""Commands: at-least-once delivery, exactly-once effect, across agent restarts."""

from __future__ import annotations

import asyncio

from sqlalchemy import update

from controlplane import ControlPlane
from controlplane.fleet import CommandState
from controlplane.store import CommandRow
from tests.conftest import AgentFactory, eventually


async def test_redelivered_command_is_not_executed_twice_across_agent_restart(
    control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    node = await agent_factory("node-1", control_plane.port)
    first = await control_plane.commands.send(
        "node-1", "set_telemetry_interval", {"seconds": 3}, timeout=5
    )
    assert first.succeeded and first.output["previous_seconds"] == 0.2
    await node.stop()

    # Pretend the result never reached the store (lost with the connection): the ledger still
    # has the command open, so the next session re-sends it.
    def reopen(db):  # type: ignore[no-untyped-def]
        db.execute(
            update(CommandRow)
            .where(CommandRow.command_id == first.command_id)
            .values(state=CommandState.SENT.value, outcome="", output={})
        )

    await control_plane.store.run(reopen)
    restarted = await agent_factory("node-1", control_plane.port)

    async def finished() -> bool:
        stored = await control_plane.commands.get(first.command_id)
        return stored is not None and stored[0] is CommandState.FINISHED

    await eventually(finished)
    stored = await control_plane.commands.get(first.command_id)
    assert stored is not None
    _, result = stored
    # The same result as the first execution: had it run again, previous_seconds would be 3.
    assert result is not None and result.output == first.output
    # The interval set by the first execution survived the agent restart.
    assert restarted.agent._interval_s == 3.0


async def test_commands_run_in_the_order_sent(
    control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    results = await asyncio.gather(
        *(
            control_plane.commands.send(
                "node-1", "set_telemetry_interval", {"seconds": s}, timeout=5
            )
            for s in (1, 2, 3, 4)
        )
    )
    previous = [r.output["previous_seconds"] for r in results]
    assert previous == [0.2, 1.0, 2.0, 3.0]
