"""The autonomy breaker: it trips on planner rollbacks or an unhealthy fleet, holds planner
plans (new, queued and running) while operator plans go through, survives a restart, and only
an operator's reset closes it."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from sentinel.v1 import (
    autonomy_pb2,
    autonomy_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    plan_pb2,
)

from controlplane.autonomy import ACTOR, Autonomy, BreakerState, BreakerThresholds
from controlplane.plans import Limits, Phase, Plan, PlanChange, PlanRepository
from controlplane.store import Store
from tests.autonomy.seed import OPERATOR, PLANNER, seed_plan
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.plan_helpers import plan, plan_client, step, wait_phase, wait_terminal
from tests.processes.test_processes import _metrics as scrape_metrics

pytestmark = pytest.mark.timeout(90)

FAILING_GATE = [("impossible", "size(sample.gpus) > 1000", 5.0)]


def _autonomy_file(tmp_path: pathlib.Path, rollbacks: int, unhealthy: float = 0.0) -> str:
    path = tmp_path / "autonomy.yaml"
    path.write_text(
        "breaker:\n"
        f"  max_rollbacks: {rollbacks}\n"
        f"  max_unhealthy_fraction: {unhealthy}\n"
        "  window_seconds: 600\n"
        "budgets: []\n"
    )
    return str(path)


@asynccontextmanager
async def autonomy_client(
    pki: Pki, port: int, role: str = "operator", name: str = "alice"
) -> AsyncIterator[autonomy_pb2_grpc.AutonomyServiceStub]:
    async with grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials(role, name)
    ) as channel:
        yield autonomy_pb2_grpc.AutonomyServiceStub(channel)


async def _breaker(pki: Pki, port: int) -> autonomy_pb2.AutonomyBreaker:
    async with autonomy_client(pki, port, "viewer", "vera") as stub:
        return (await stub.GetAutonomyStatus(autonomy_pb2.GetAutonomyStatusRequest())).breaker


async def _breaker_events(pki: Pki, port: int) -> list[events_pb2.BreakerChanged]:
    async with grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials("viewer", "vera")
    ) as channel:
        listed = await events_pb2_grpc.EventServiceStub(channel).ListEvents(
            events_pb2.ListEventsRequest(kinds=[events_pb2.EVENT_KIND_BREAKER_CHANGED])
        )
    assert all(e.subject == "autonomy/breaker" for e in listed.events)
    return [e.breaker_changed for e in listed.events]


async def test_breaker_trips_on_planner_rollbacks_holds_planner_plans_and_an_operator_resets_it(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    settings = {
        "autonomy_policy_path": _autonomy_file(tmp_path, rollbacks=2),
        "autonomy_interval_s": 0.2,
    }
    cp = await control_plane_factory(**settings)
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        for _ in range(2):
            failing = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(
                    plan=plan(step("cordon", ["node-a"]), gates=FAILING_GATE)
                )
            )
            done = await wait_terminal(planner, failing.plan.plan_id)
            assert done.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK, done.status_message

        breaker = await eventually(lambda: _tripped(pki, cp.port), timeout=10)
        assert "2 planner plans rolled back" in breaker.reason and "limit 2" in breaker.reason
        assert breaker.thresholds.max_rollbacks == 2
        assert breaker.thresholds.window.ToTimedelta() == dt.timedelta(seconds=600)

        # A new planner plan waits for an operator, whatever the policies say.
        held = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 3}))
            )
        )
        assert held.plan.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
        assert [v.rule_id for v in held.plan.violations] == ["autonomy-breaker"]
        assert held.plan.waiting_reason.startswith("autonomy breaker tripped: ")

    # An operator's plan goes through.
    async with plan_client(pki, cp.port, "operator", "alice") as operator:
        own = await operator.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 2}))
            )
        )
        assert own.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
        done = await wait_terminal(operator, own.plan.plan_id)
        assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message

    events = await eventually(lambda: _breaker_events(pki, cp.port))
    assert [(e.tripped, e.actor) for e in events] == [(True, "autonomy-breaker")]
    assert scrape_metrics(cp.metrics_port)["sentinel_autonomy_breaker_tripped{}"] == 1

    # The trip survives a restart on the same database.
    await cp.stop()
    cp = await control_plane_factory(**settings)
    assert (await _breaker(pki, cp.port)).tripped
    async with plan_client(pki, cp.port) as planner:
        again = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 4})),
                validate_only=True,
            )
        )
        assert again.plan.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL

    # Only an operator resets it, and only with a reason.
    async with autonomy_client(pki, cp.port, "planner", "inframind") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ResetBreaker(autonomy_pb2.ResetBreakerRequest(reason="I am fine"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with autonomy_client(pki, cp.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ResetBreaker(autonomy_pb2.ResetBreakerRequest(reason="  "))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.details() == "reason: required"
        reset = (
            await stub.ResetBreaker(
                autonomy_pb2.ResetBreakerRequest(reason="gate fixed, rollbacks understood")
            )
        ).breaker
    assert not reset.tripped
    assert reset.reset_by == "spiffe://sentinel.local/operator/alice"
    assert reset.reset_reason == "gate fixed, rollbacks understood"
    assert reset.reset_time.ToDatetime(dt.UTC) <= dt.datetime.now(dt.UTC)
    assert reset.reason  # the last trip's reason stays on record

    events = await eventually(lambda: _events_at_least(pki, cp.port, 2))
    assert [(e.tripped, e.actor) for e in events] == [
        (True, "autonomy-breaker"),
        (False, "spiffe://sentinel.local/operator/alice"),
    ]
    assert events[1].reason == "gate fixed, rollbacks understood"

    # The rollbacks before the reset no longer count: planner plans pass again; the plan held
    # before the reset still waits for its own approval.
    await asyncio.sleep(0.6)
    assert not (await _breaker(pki, cp.port)).tripped
    async with plan_client(pki, cp.port) as planner:
        passed = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 4})),
                validate_only=True,
            )
        )
        assert passed.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
        still = await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=held.plan.plan_id))
        assert still.plan.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
    assert scrape_metrics(cp.metrics_port)["sentinel_autonomy_breaker_tripped{}"] == 0


async def _tripped(pki: Pki, port: int) -> autonomy_pb2.AutonomyBreaker | None:
    breaker = await _breaker(pki, port)
    return breaker if breaker.tripped else None


async def _events_at_least(pki: Pki, port: int, count: int) -> list[events_pb2.BreakerChanged]:
    events = await _breaker_events(pki, port)
    return events if len(events) >= count else []


async def test_a_running_planner_plan_pauses_before_its_next_wave_until_an_operator_approves(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        autonomy_policy_path=_autonomy_file(tmp_path, rollbacks=2), autonomy_interval_s=0.2
    )
    a = await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    await a.stop()  # away: the first wave waits for it
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step(
                        "set_telemetry_interval",
                        ["node-a", "node-b"],
                        {"seconds": 3},
                        timeout_s=30,
                    ),
                    parallel=1,
                )
            )
        )
        plan_id = submitted.plan.plan_id
        assert submitted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
        await wait_phase(planner, plan_id, plan_pb2.PLAN_PHASE_EXECUTING)
        # Meanwhile two planner plans roll back elsewhere: the breaker trips mid-wave.
        for _ in range(2):
            await seed_plan(cp.plans.repository, Phase.ROLLED_BACK)
        await eventually(lambda: _tripped(pki, cp.port), timeout=10)
        await agent_factory("node-a", cp.port)  # the first wave finishes

        paused = await wait_phase(planner, plan_id, plan_pb2.PLAN_PHASE_PAUSED)
        assert "autonomy breaker tripped" in paused.status_message
        assert paused.waiting_reason.startswith("autonomy breaker tripped: ")
        assert [r.node_id for r in paused.steps[0].node_results] == ["node-a"]

    async with plan_client(pki, cp.port, "operator", "alice") as operator:
        await operator.ApprovePlan(
            plan_pb2.ApprovePlanRequest(plan_id=plan_id, reason="node-b is safe")
        )
        done = await wait_terminal(operator, plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert [r.node_id for r in done.steps[0].node_results] == ["node-a", "node-b"]


async def test_breaker_trips_when_too_much_of_the_fleet_is_unhealthy(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        autonomy_policy_path=_autonomy_file(tmp_path, rollbacks=0, unhealthy=0.4),
        autonomy_interval_s=0.2,
    )
    await agent_factory("node-a", cp.port)
    b = await agent_factory("node-b", cp.port)
    await asyncio.sleep(0.5)
    assert not (await _breaker(pki, cp.port)).tripped
    await b.stop()
    breaker = await eventually(lambda: _tripped(pki, cp.port), timeout=10)
    assert "1 of 2 nodes unhealthy" in breaker.reason and "node-b" in breaker.reason

    # A reset acknowledges the nodes already away: it does not trip again for them.
    async with autonomy_client(pki, cp.port) as stub:
        await stub.ResetBreaker(autonomy_pb2.ResetBreakerRequest(reason="node-b retired"))
    await asyncio.sleep(1.0)
    assert not (await _breaker(pki, cp.port)).tripped


async def test_a_restarted_control_plane_does_not_trip_on_agents_not_yet_back(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    # After a restart every agent looks silent until it reconnects: not news about the fleet.
    autonomy = _autonomy_file(tmp_path, rollbacks=0, unhealthy=0.4)
    cp = await control_plane_factory(autonomy_policy_path=autonomy, autonomy_interval_s=0.2)
    agents = [await agent_factory(n, cp.port) for n in ("node-a", "node-b")]
    await cp.stop()
    for agent in agents:
        await agent.stop()
    restarted = await control_plane_factory(autonomy_policy_path=autonomy, autonomy_interval_s=0.2)
    await asyncio.sleep(1.0)  # five judgements
    assert not (await _breaker(pki, restarted.port)).tripped


# --- the domain, without a server -------------------------------------------------------------


def _changed(_change: PlanChange) -> None:
    pass


async def test_one_trip_is_one_change_however_many_replicas_judge_it(database_url: str) -> None:
    store = Store(database_url)
    await asyncio.to_thread(store.migrate)
    try:
        repository = PlanRepository(store, _changed)
        changes: list[tuple[bool, str]] = []

        def replica(name: str) -> Autonomy:
            return Autonomy(
                store,
                lambda: repository,
                thresholds=BreakerThresholds(max_rollbacks=1, window_s=600),
                calibration_window_s=3600,
                replica_id=name,
                on_breaker_changed=lambda state, actor, _why: changes.append(
                    (state.tripped, actor)
                ),
            )

        first, second = replica("r1"), replica("r2")
        queued = await seed_plan(repository, Phase.APPROVED)
        operators = await seed_plan(repository, Phase.APPROVED, submitted_by=OPERATOR)
        await seed_plan(repository, Phase.ROLLED_BACK)

        await asyncio.gather(first.evaluate(), second.evaluate())
        await asyncio.gather(first.evaluate(), second.evaluate())
        assert changes == [(True, ACTOR)]
        assert first.state.tripped and second.state.tripped
        assert first.state.trip_time == second.state.trip_time

        # The queued planner plan went back for approval; the operator's did not.
        requeued = await repository.get(queued.plan_id)
        assert requeued.phase == Phase.AWAITING_APPROVAL
        assert requeued.transitions[-1].actor == ACTOR
        assert requeued.waiting_reason.startswith("autonomy breaker tripped: 1 planner plans")
        assert (await repository.get(operators.plan_id)).phase == Phase.APPROVED

        # An operator's approval after the trip lets it be: it is not sent back again, and
        # it does not pause before its waves.
        approved = await repository.save(
            requeued, to_phase=Phase.APPROVED, actor=OPERATOR, reason="approved by alice"
        )
        await first.evaluate()
        approved = await repository.get(queued.plan_id)
        assert approved.phase == Phase.APPROVED
        assert first.wave_hold(approved) is None
        assert first.admission_hold(approved) is not None  # a new plan like it would wait

        state = await first.reset(OPERATOR, "understood")
        assert not state.tripped and state.reset_by == OPERATOR
        assert changes[-1] == (False, OPERATOR)
        await second.evaluate()
        assert not second.state.tripped  # the rollback before the reset does not count
    finally:
        store.close()


def test_wave_hold_spares_operator_plans_and_keeps_a_breaker_pause_across_restarts() -> None:
    autonomy = Autonomy(
        None,  # type: ignore[arg-type]  # no store: only the in-memory judgement is used
        lambda: None,  # type: ignore[arg-type,return-value]
        thresholds=BreakerThresholds(max_rollbacks=1),
        calibration_window_s=3600,
        replica_id="r",
    )
    now = dt.datetime.now(dt.UTC)
    autonomy.state = BreakerState(tripped=True, reason="3 planner plans rolled back", trip_time=now)

    def plan_by(who: str, phase: Phase = Phase.EXECUTING, waiting: str = "") -> Plan:
        return Plan(
            "p", "r", "inframind", "", 0.9, None, [], (), Limits(), who, phase,
            waiting_reason=waiting,
        )  # fmt: skip

    assert autonomy.wave_hold(plan_by(OPERATOR)) is None
    assert autonomy.wave_hold(plan_by(PLANNER)) == (
        "autonomy breaker tripped: 3 planner plans rolled back"
    )
    autonomy.state = BreakerState()
    assert autonomy.wave_hold(plan_by(PLANNER)) is None
    paused = plan_by(PLANNER, Phase.PAUSED, "autonomy breaker tripped: earlier")
    assert autonomy.wave_hold(paused) == "autonomy breaker tripped: earlier"


def test_a_new_xid_counts_as_unhealthy_and_the_first_value_seen_is_only_a_baseline() -> None:
    """XIDs are watched per sample as telemetry arrives (no pass over the fleet)."""
    autonomy = Autonomy(
        None,  # type: ignore[arg-type]  # no store: only the in-memory judgement is used
        lambda: None,  # type: ignore[arg-type,return-value]
        thresholds=BreakerThresholds(max_unhealthy_fraction=0.2),
        calibration_window_s=3600,
        replica_id="r",
        fleet_size=lambda: 4,
    )
    assert autonomy.watches_xids
    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    autonomy.observe_xids("node-a", (0, 79))  # a value from before: the baseline, not news
    autonomy.observe_xids("node-a", (0, 79))
    autonomy.observe_xids("node-b", (0, 0))
    autonomy.observe_xids("node-b", (0, 0))
    assert autonomy._trip_reason(BreakerState(), now) is None
    autonomy.observe_xids("node-b", (48, 0))
    reason = autonomy._trip_reason(BreakerState(), now)
    assert reason is not None
    assert reason.startswith("1 of 4 nodes unhealthy (25%, limit 20%): node-b new XID (48, 0)")
