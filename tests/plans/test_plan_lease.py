"""One pipeline controller acts at a time: the lease in the store, its fencing epoch, and the
state machine's table."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sentinel.v1 import plan_pb2
from sqlalchemy import Connection, select

from controlplane import ControlPlane
from controlplane.plans import (
    ALLOWED_TRANSITIONS,
    IllegalTransition,
    Lease,
    LeaseLost,
    Limits,
    Phase,
    Plan,
    PlanChange,
    PlanRepository,
    Step,
    Target,
    Transition,
)
from controlplane.plans._model import check_transition
from controlplane.plans._repository import Decision
from controlplane.store import COMMANDS, Store
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually, needs_postgres
from tests.plan_helpers import phases, plan, plan_client, step, wait_terminal


def _plan(plan_id: str) -> Plan:
    return Plan(
        plan_id=plan_id,
        request_id=f"req-{plan_id}",
        source="test",
        rationale="",
        confidence=1.0,
        expire_at=None,
        steps=[Step(0, "s0", "cordon", (Target(node_id="n1"),), {}, 10.0)],
        health_gates=(),
        limits=Limits(),
        phase=Phase.APPROVED,
    )


async def test_a_replaced_leader_cannot_write(store: Store) -> None:
    changes: list[PlanChange] = []
    repository = PlanRepository(store, changes.append)
    now = dt.datetime.now(dt.UTC)
    draft = _plan("plan-1")
    transition = Transition(Phase.VALIDATING, Phase.APPROVED, now, "test", "ok")
    decided = await repository.submit_new(
        draft, now, lambda _counts: Decision(draft, "digest", (transition,), store=True)
    )
    assert isinstance(decided, Decision)
    created = decided.plan
    old = Lease(store, "pipeline-controller", "old-leader", duration_s=0.2)
    new = Lease(store, "pipeline-controller", "new-leader", duration_s=10)
    old_fence = await old.acquire_or_renew()
    assert old_fence is not None and old_fence.epoch == 1
    assert await new.acquire_or_renew() is None  # held and unexpired

    await asyncio.sleep(0.3)  # the old leader stalls past its lease
    new_fence = await new.acquire_or_renew()
    assert new_fence is not None and new_fence.epoch == 2

    with pytest.raises(LeaseLost):
        await repository.save(
            created, to_phase=Phase.EXECUTING, actor="old-leader", reason="late", fence=old_fence
        )
    stored = await repository.get("plan-1")
    assert stored.phase == Phase.APPROVED and stored.version == created.version
    # The old leader's renewal does not take the lease back either.
    assert await old.acquire_or_renew() is None
    moved = await repository.save(
        created, to_phase=Phase.EXECUTING, actor="new-leader", reason="ok", fence=new_fence
    )
    assert moved.phase == Phase.EXECUTING


async def test_state_machine_allows_exactly_the_designed_transitions() -> None:
    # As docs/plans.md draws it. A plan is stored already past VALIDATING, so nothing can
    # cancel a PENDING one: that edge is absent, not merely unused.
    designed = {
        ("PENDING", "VALIDATING"),
        ("VALIDATING", "APPROVED"), ("VALIDATING", "REJECTED"),
        ("VALIDATING", "AWAITING_APPROVAL"),
        ("AWAITING_APPROVAL", "APPROVED"), ("AWAITING_APPROVAL", "CANCELLED"),
        ("APPROVED", "EXECUTING"), ("APPROVED", "CANCELLED"),
        ("APPROVED", "AWAITING_APPROVAL"),  # the autonomy breaker tripped before it started
        ("EXECUTING", "COMPLETED"), ("EXECUTING", "FAILED"), ("EXECUTING", "ROLLING_BACK"),
        ("ROLLING_BACK", "ROLLED_BACK"), ("ROLLING_BACK", "FAILED"),
        ("EXECUTING", "PAUSED"), ("PAUSED", "EXECUTING"),
    }  # fmt: skip
    allowed = set()
    for current in Phase:
        for target in Phase:
            try:
                check_transition(current, target)
            except IllegalTransition:
                continue
            allowed.add((current.value, target.value))
    assert allowed == designed
    assert all(not ALLOWED_TRANSITIONS.get(p) for p in Phase if p.terminal)
    with pytest.raises(IllegalTransition, match="PENDING cannot move to CANCELLED"):
        check_transition(Phase.PENDING, Phase.CANCELLED)


@needs_postgres
async def test_only_one_of_two_control_planes_drives_plans_and_the_other_takes_over(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    # Two control planes on one database, as behind a load balancer. A command reaches a node
    # through the control plane the node is connected to, so the node connects to the first
    # one, the leader; the second learns of the node from the database when it starts.
    leader = await control_plane_factory(controller_id="cp-1", controller_lease_s=5.0)
    await eventually(lambda: leader.controller.leader)
    await agent_factory("node-a", leader.port)
    follower = await control_plane_factory(controller_id="cp-2", controller_lease_s=5.0)

    # One plan through each control plane's API; both are driven by the leader alone.
    plan_ids = [await _submit_diagnostic(pki, cp, "node-a") for cp in (leader, follower)]
    async with plan_client(pki, follower.port) as planner:
        for plan_id in plan_ids:
            done = await wait_terminal(planner, plan_id)
            assert phases(done)[-2:] == ["EXECUTING", "COMPLETED"], done.status_message
    assert (_steps_run(leader), _steps_run(follower)) == (2, 0)
    assert (_executions_started(leader), _executions_started(follower)) == (2, 0)
    # Each command was stored once and sent once, by the leader.
    assert await _commands(leader, "node-a") == [
        (plan_id, "run_diagnostic", "FINISHED", "SUCCEEDED", 1) for plan_id in plan_ids
    ]

    await leader.stop()  # releases the lease on the way out
    await eventually(lambda: follower.controller.leader, timeout=10)
    await agent_factory("node-b", follower.port)
    taken_over = await _submit_diagnostic(pki, follower, "node-b")
    async with plan_client(pki, follower.port) as planner:
        done = await wait_terminal(planner, taken_over)
    assert phases(done)[-2:] == ["EXECUTING", "COMPLETED"], done.status_message
    assert (_steps_run(follower), _executions_started(follower)) == (1, 1)
    assert await _commands(follower, "node-b") == [
        (taken_over, "run_diagnostic", "FINISHED", "SUCCEEDED", 1)
    ]


async def _submit_diagnostic(pki: Pki, cp: ControlPlane, node_id: str) -> str:
    async with plan_client(pki, cp.port) as planner:
        response = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", [node_id])))
        )
    assert response.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
    return str(response.plan.plan_id)


def _steps_run(cp: ControlPlane) -> float:
    """Plan steps this control plane's controller carried out (its own /metrics)."""
    labels = {"action": "run_diagnostic", "result": "succeeded"}
    count = cp.metrics.registry.get_sample_value(
        "sentinel_plan_step_duration_seconds_count", labels
    )
    return count or 0.0


def _executions_started(cp: ControlPlane) -> float:
    """Plans this control plane moved to EXECUTING."""
    count = cp.metrics.registry.get_sample_value(
        "sentinel_plan_transitions_total", {"phase": "executing"}
    )
    return count or 0.0


async def _commands(cp: ControlPlane, node_id: str) -> list[tuple[str, str, str, str, int]]:
    def read(db: Connection) -> list[tuple[str, str, str, str, int]]:
        rows = db.execute(
            select(
                COMMANDS.c.plan_id,
                COMMANDS.c.action,
                COMMANDS.c.state,
                COMMANDS.c.outcome,
                COMMANDS.c.deliveries,
            )
            .where(COMMANDS.c.node_id == node_id)
            .order_by(COMMANDS.c.created_at)
        )
        return [(r.plan_id, r.action, r.state, r.outcome, r.deliveries) for r in rows]

    return await cp.store.run_core(read)
