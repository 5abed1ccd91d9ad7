"""The control plane SIGKILLed at random moments of running plans, many times in a row (seeded):
every plan ends in a consistent terminal phase, no command runs twice on an agent, the ledger
and the plans agree, the audit log has every transition, and a restarted control plane resumes
its plans within 5 s of its agents being back."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sentinel.v1 import plan_pb2
from sqlalchemy import create_engine, text

from nodeagent import actions
from tests.conftest import AgentFactory, Pki, eventually
from tests.plan_helpers import TERMINAL, plan, plan_client, step
from tests.replicas._rig import free_port, start_replica

SEED = int(os.environ.get("SENTINEL_FAULT_SEED", "20261130"))
KILLS = 5


def _rows(database_url: str, sql: str, **params: object) -> list[tuple[Any, ...]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as db:
            return [tuple(r) for r in db.execute(text(sql), params)]
    finally:
        engine.dispose()


async def _listening(port: int, process: subprocess.Popen[bytes]) -> None:
    async def accepts() -> bool:
        assert process.poll() is None, "the control plane exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await eventually(accepts, timeout=30)


async def test_control_plane_killed_at_random_moments_finishes_every_plan_once(
    pki: Pki,
    database_url: str,
    tmp_path: Path,
    agent_factory: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(SEED)
    # Every real execution of the action on an agent, by agent: a command run twice shows here.
    runs: collections.Counter[str] = collections.Counter()
    diagnostic = actions.ACTIONS["run_diagnostic"]

    async def counted(controls: actions.AgentControls, parameters: dict[str, Any]) -> Any:
        runs[controls.state_dir.name] += 1
        await asyncio.sleep(rng.uniform(0.05, 0.3))  # work that a kill can land in
        return await diagnostic(controls, parameters)

    monkeypatch.setitem(actions.ACTIONS, "run_diagnostic", counted)
    port = free_port()
    flags = ("--replica-stale-after-s", "2", "--reconcile-interval-s", "0.5")
    process = start_replica(pki, database_url, tmp_path / "cp.log", port, "cp-0", *flags)
    try:
        await _listening(port, process)
        nodes = ["node-a", "node-b"]
        agents = [await agent_factory(n, port) for n in nodes]
        async with plan_client(pki, port) as planner:
            plan_ids = []
            for i in range(4):
                submitted = await planner.SubmitPlan(
                    plan_pb2.SubmitPlanRequest(
                        plan=plan(
                            step("run_diagnostic", nodes, timeout_s=120),
                            step("run_diagnostic", nodes, timeout_s=120),
                            parallel=1,
                        ),
                        request_id=f"random-kill-{SEED}-{i}",
                    )
                )
                plan_ids.append(submitted.plan.plan_id)
        resumes: list[float] = []
        for kill in range(1, KILLS + 1):
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            before = sum(runs.values())
            sessions = [a.agent.sessions_opened for a in agents]
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            process = start_replica(
                pki, database_url, tmp_path / "cp.log", port, f"cp-{kill}", *flags
            )
            await _listening(port, process)

            def reconnected(counts: list[int] = sessions) -> bool:
                return all(a.agent.sessions_opened > n for a, n in zip(agents, counts, strict=True))

            await eventually(reconnected, timeout=30)
            back = time.monotonic()
            remaining = _rows(
                database_url,
                "SELECT count(*) FROM commands WHERE state <> 'FINISHED'",
            )[0][0] + sum(
                1
                for (phase,) in _rows(database_url, "SELECT phase FROM plans")
                if phase not in ("COMPLETED", "FAILED", "ROLLED_BACK", "CANCELLED", "REJECTED")
            )
            if remaining:
                # Work left: the new control plane must get on with it promptly.
                def progressed(count: int = before) -> bool:
                    return sum(runs.values()) > count

                await eventually(progressed, timeout=30)
                resumes.append(time.monotonic() - back)
        async with plan_client(pki, port) as planner:

            async def all_terminal() -> bool:
                for plan_id in plan_ids:
                    got = await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id))
                    if got.plan.phase not in TERMINAL:
                        return False
                return True

            await eventually(all_terminal, timeout=120)
            final = [
                (await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=p))).plan for p in plan_ids
            ]
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)

    assert [p.phase for p in final] == [plan_pb2.PLAN_PHASE_COMPLETED] * len(plan_ids), [
        p.status_message for p in final
    ]
    commands = _rows(database_url, "SELECT node_id, state, outcome FROM commands ORDER BY node_id")
    # The ledger and the plans agree: 4 plans x 2 steps per node, each finished and succeeded.
    assert collections.Counter((n, s, o) for n, s, o in commands) == {
        (n, "FINISHED", "SUCCEEDED"): 8 for n in nodes
    }
    # No command ran twice on an agent.
    assert runs == {f"agent-{n}": 8 for n in nodes}, runs
    for plan_message in final:
        audited = _rows(
            database_url,
            "SELECT count(*) FROM audit_events WHERE target = :t AND method = 'plan.transition'",
            t=f"plan/{plan_message.plan_id}",
        )[0][0]
        assert audited == len(plan_message.transitions)
    assert all(r <= 5.0 for r in resumes), f"resumed {resumes} s after the agents were back"
