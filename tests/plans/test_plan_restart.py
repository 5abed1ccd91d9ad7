"""A control plane killed (SIGKILL) in the middle of a plan, and started again, finishes the
plan without doing any step twice."""

from __future__ import annotations

import os
import signal
import subprocess

from sentinel.v1 import plan_pb2
from sqlalchemy import create_engine, text

from tests.conftest import AgentFactory, Pki, eventually
from tests.fleet.test_restart_delivery import _free_port, _start_process, _wait_listening
from tests.plan_helpers import phases, plan, plan_client, step, wait_terminal


def _commands_per_node(database_url: str, plan_id: str) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as db:
            rows = db.execute(
                text("SELECT node_id, count(*) FROM commands WHERE plan_id = :p GROUP BY node_id"),
                {"p": plan_id},
            )
            return {node: int(count) for node, count in rows}
    finally:
        engine.dispose()


async def test_plan_survives_sigkill_of_control_plane_without_repeating_a_step(
    pki: Pki, database_url: str, agent_factory: AgentFactory
) -> None:
    port = _free_port()
    process = _start_process(pki, port, database_url)
    try:
        await _wait_listening(process)
        a = await agent_factory("node-a", port)
        b = await agent_factory("node-b", port)
        await b.stop()  # node-b is known but away: the plan stops half-way, waiting for it
        async with plan_client(pki, port) as planner:
            submitted = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(
                    plan=plan(
                        step(
                            "set_telemetry_interval",
                            ["node-a", "node-b"],
                            {"seconds": 5},
                            timeout_s=60,
                        ),
                        parallel=1,
                    ),
                    request_id="survive-sigkill",
                )
            )
            plan_id = submitted.plan.plan_id

            async def node_a_done() -> bool:
                got = (await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id))).plan
                return any(
                    r.node_id == "node-a" and r.outcome == "SUCCEEDED"
                    for r in got.steps[0].node_results
                )

            await eventually(node_a_done, timeout=15)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)

        process = _start_process(pki, port, database_url)
        await _wait_listening(process)
        await agent_factory("node-b", port)
        async with plan_client(pki, port) as planner:
            done = await wait_terminal(planner, plan_id, timeout=30)
            # The planner retrying its submission after the outage gets the same plan back.
            again = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=submitted.plan, request_id="survive-sigkill")
            )
        assert again.replayed and again.plan.plan_id == plan_id
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert phases(done) == ["PENDING", "VALIDATING", "APPROVED", "EXECUTING", "COMPLETED"]
    assert {r.node_id: r.outcome for r in done.steps[0].node_results} == {
        "node-a": "SUCCEEDED",
        "node-b": "SUCCEEDED",
    }
    # One command per node in the ledger: the restarted controller attached to node-a's
    # finished command instead of sending it again.
    assert _commands_per_node(database_url, plan_id) == {"node-a": 1, "node-b": 1}
    assert a.agent._interval() == 5.0
