"""One pipeline controller acts at a time: the lease in the store, its fencing epoch, and the
state machine's table."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

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
from controlplane.store import Store
from tests.conftest import ControlPlaneFactory, eventually


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = Store(database_url)
    await asyncio.to_thread(opened.migrate)
    yield opened
    opened.close()


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
    designed = {
        ("PENDING", "VALIDATING"), ("PENDING", "CANCELLED"),
        ("VALIDATING", "APPROVED"), ("VALIDATING", "REJECTED"),
        ("VALIDATING", "AWAITING_APPROVAL"),
        ("AWAITING_APPROVAL", "APPROVED"), ("AWAITING_APPROVAL", "CANCELLED"),
        ("APPROVED", "EXECUTING"), ("APPROVED", "CANCELLED"),
        ("EXECUTING", "COMPLETED"), ("EXECUTING", "FAILED"), ("EXECUTING", "ROLLING_BACK"),
        ("ROLLING_BACK", "ROLLED_BACK"), ("ROLLING_BACK", "FAILED"),
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


async def test_only_one_of_two_control_planes_drives_plans_and_the_other_takes_over(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    first = await control_plane_factory(controller_id="cp-1", controller_lease_s=1.0)
    second = await control_plane_factory(controller_id="cp-2", controller_lease_s=1.0)
    await eventually(lambda: first.controller.leader or second.controller.leader)
    await asyncio.sleep(0.5)
    assert first.controller.leader != second.controller.leader
    leader, follower = (first, second) if first.controller.leader else (second, first)
    await leader.stop()  # releases the lease on the way out
    await eventually(lambda: follower.controller.leader, timeout=10)
