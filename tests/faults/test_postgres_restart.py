"""PostgreSQL restarted under load (fast and immediate shutdown): the control plane keeps its
agent sessions, its pool reconnects, and no acknowledged telemetry, command or plan transition
is lost or doubled.

The server is the suite's own throwaway PostgreSQL (scripts/test.sh exports how to drive it);
the test restarts it for real with pg_ctl."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from sentinel.v1 import plan_pb2
from sqlalchemy import create_engine, text

from tests.conftest import TEST_DB, AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.fleet.test_restart_delivery import assert_contiguous, stream_seqs
from tests.plan_helpers import phases, plan, plan_client, step, wait_terminal

PG_CTL = os.environ.get("SENTINEL_TEST_PG_CTL", "")
PG_DATA = os.environ.get("SENTINEL_TEST_PG_DATA", "")
PG_OWNER = os.environ.get("SENTINEL_TEST_PG_OWNER", "")

pytestmark = pytest.mark.skipif(
    TEST_DB != "postgresql" or not (PG_CTL and PG_DATA),
    reason="restarts the suite's own PostgreSQL: needs SENTINEL_TEST_DB=postgresql and "
    "SENTINEL_TEST_PG_CTL/SENTINEL_TEST_PG_DATA (scripts/test.sh sets them)",
)


def _restart_postgres(mode: str) -> None:
    command = [PG_CTL, "-D", PG_DATA, "-m", mode, "-w", "-t", "60", "restart"]
    if PG_OWNER:
        command = ["runuser", "-u", PG_OWNER, "--", *command]
    subprocess.run(
        command, check=True, cwd=PG_DATA, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _rows(database_url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as db:
            return [tuple(r) for r in db.execute(text(sql), params)]
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgresql_restart_under_load_loses_and_doubles_nothing(
    mode: str,
    pki: Pki,
    database_url: str,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    cp = await control_plane_factory()
    nodes = ["node-1", "node-2"]
    agents = [await agent_factory(node, cp.port) for node in nodes]
    async with (
        stream_seqs(pki, cp.port, "node-1", lambda: cp.hub.subscriber_count) as seen,
        plan_client(pki, cp.port) as planner,
    ):
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    *(step("run_diagnostic", nodes, timeout_s=60) for _ in range(4)),
                    parallel=1,
                )
            )
        )
        plan_id = submitted.plan.plan_id
        await eventually(lambda: len(seen) >= 5)
        await asyncio.to_thread(_restart_postgres, mode)
        produced = {a.agent.settings.node_id: a.agent.last_sample.seq for a in agents}
        done = await wait_terminal(planner, plan_id, timeout=90)
        # Everything produced up to the restart is stored and was streamed once.
        await eventually(
            lambda: all(cp.registry.get(n).last_telemetry_seq >= s for n, s in produced.items()),
            timeout=30,
        )
        await eventually(lambda: max(seen) >= produced["node-1"], timeout=30)
    assert_contiguous(seen)
    assert phases(done)[-1] == "COMPLETED", done.status_message
    # Sessions survived: each agent opened exactly one.
    assert [a.agent.sessions_opened for a in agents] == [1, 1]
    for node in nodes:
        state = cp.registry.get(node)
        assert state is not None and state.telemetry_gap_samples == 0
    # One command per node and step, none doubled; every transition is in the audit log.
    commands = _rows(
        database_url,
        "SELECT node_id, count(*), min(state) FROM commands WHERE plan_id = :p GROUP BY node_id",
        p=plan_id,
    )
    assert sorted(commands) == [(n, 4, "FINISHED") for n in nodes]
    transitions = _rows(
        database_url, "SELECT count(*) FROM plan_transitions WHERE plan_id = :p", p=plan_id
    )[0][0]
    audited = _rows(
        database_url,
        "SELECT count(*) FROM audit_events WHERE target = :t AND method = 'plan.transition'",
        t=f"plan/{plan_id}",
    )[0][0]
    assert transitions == len(done.transitions) == audited
