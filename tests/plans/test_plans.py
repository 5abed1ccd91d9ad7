"""Plans end to end over mTLS with real agents: submission, policy verdicts, approval,
execution on nodes, rollback, idempotency and the event stream."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest
from google.protobuf import json_format
from sentinel.v1 import audit_pb2, audit_pb2_grpc, plan_pb2, plan_pb2_grpc
from sqlalchemy import Connection, select

from controlplane import ControlPlane
from controlplane.store import COMMANDS
from sentinelctl import main as ctl_main
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.fakenvml import FakeNvml, h100
from tests.plan_helpers import (
    APPROVAL_POLICY,
    phases,
    plan,
    plan_client,
    step,
    wait_terminal,
    write_policy,
)
from tests.processes.test_processes import _metrics as scrape_metrics

STRICT_POLICY = """
policy_id: strict
description: two rules a plan can break at once
rules:
  - rule_id: minimum-confidence
    expression: plan.confidence >= 0.3
    message: InfraMind must be at least 30 % sure
    field: confidence
  - rule_id: interval-floor
    scope: STEP
    expression: step.action != 'set_telemetry_interval' || step.parameters.seconds >= 2.0
    message: telemetry may not be sampled faster than every 2 s
    field: steps[{index}].parameters.seconds
"""


async def _cordon_of_node_a_approved_by(
    planner: plan_pb2_grpc.PlanServiceStub, operator: plan_pb2_grpc.PlanServiceStub
) -> str:
    """A positive control: a low-confidence cordon of node-a that `operator` approves runs to
    COMPLETED (under APPROVAL_POLICY). Returns its plan id."""
    parked = (
        await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["node-a"]), confidence=0.1))
        )
    ).plan
    assert parked.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
    await operator.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
    done = await wait_terminal(operator, parked.plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    return str(parked.plan_id)


async def _node_commands(cp: ControlPlane, node_id: str) -> list[tuple[str, str]]:
    """(plan id, action) of every command ever stored for `node_id`, oldest first."""

    def read(db: Connection) -> list[tuple[str, str]]:
        rows = db.execute(
            select(COMMANDS.c.plan_id, COMMANDS.c.action)
            .where(COMMANDS.c.node_id == node_id)
            .order_by(COMMANDS.c.created_at)
        )
        return [(row.plan_id, row.action) for row in rows]

    return await cp.store.run_core(read)


async def _deliveries(cp: ControlPlane, node_id: str) -> list[int]:
    """How often each command stored for `node_id` was sent, oldest first."""

    def read(db: Connection) -> list[int]:
        return list(
            db.scalars(
                select(COMMANDS.c.deliveries)
                .where(COMMANDS.c.node_id == node_id)
                .order_by(COMMANDS.c.created_at)
            )
        )

    return await cp.store.run_core(read)


async def test_approved_plan_runs_on_two_agents_and_completes(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    a = await agent_factory("node-a", cp.port)
    b = await agent_factory("node-b", cp.port)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("set_telemetry_interval", ["node-a", "node-b"], {"seconds": 7}),
                    parallel=2,
                ),
                request_id="two-agents",
            )
        )
        assert submitted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
        assert [(c.node_id, c.wave) for c in submitted.preview] == [("node-a", 0), ("node-b", 0)]
        done = await wait_terminal(planner, submitted.plan.plan_id)

    assert plan_pb2.PlanPhase.Name(done.phase) == "PLAN_PHASE_COMPLETED", done.status_message
    assert phases(done) == ["PENDING", "VALIDATING", "APPROVED", "EXECUTING", "COMPLETED"]
    results = {r.node_id: r for r in done.steps[0].node_results}
    assert {n: r.outcome for n, r in results.items()} == {
        "node-a": "SUCCEEDED",
        "node-b": "SUCCEEDED",
    }
    assert results["node-a"].output["seconds"] == 7.0
    assert done.steps[0].state == plan_pb2.STEP_STATE_SUCCEEDED
    assert a.agent._interval() == 7.0 and b.agent._interval() == 7.0
    assert all(t.actor for t in done.transitions)
    assert done.submitted_by == "spiffe://sentinel.local/planner/inframind"


async def test_rejected_plan_lists_every_violated_rule_and_runs_nothing(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(policy_paths=write_policy(tmp_path / "p.yaml", STRICT_POLICY))
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        response = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("run_diagnostic", ["node-a"]),
                    step("set_telemetry_interval", ["node-a"], {"seconds": 1}),
                    confidence=0.1,
                )
            )
        )
    rejected = response.plan
    assert rejected.phase == plan_pb2.PLAN_PHASE_REJECTED
    assert sorted((v.rule_id, v.field) for v in rejected.violations) == [
        ("interval-floor", "steps[1].parameters.seconds"),
        ("minimum-confidence", "confidence"),
    ]
    assert all(v.message for v in rejected.violations)
    assert list(response.preview) == []
    assert "minimum-confidence" in rejected.transitions[-1].reason
    commands = await cp.store.run_core(
        lambda db: db.exec_driver_sql("SELECT count(*) FROM commands").scalar()
    )
    assert commands == 0


async def test_low_confidence_plan_waits_for_an_operator_then_runs(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        policy_paths=write_policy(tmp_path / "p.yaml", APPROVAL_POLICY)
    )
    await agent_factory("node-a", cp.port)
    request = plan_pb2.SubmitPlanRequest(
        plan=plan(step("cordon", ["node-a"]), confidence=0.5), request_id="needs-approval"
    )
    async with (
        plan_client(pki, cp.port) as planner,
        plan_client(pki, cp.port, "operator", "alice") as alice,
    ):
        parked = (await planner.SubmitPlan(request)).plan
        assert parked.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
        assert [v.rule_id for v in parked.violations] == ["confidence-floor"]

        # The planner may not approve (role table), not even its own plan.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await planner.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await asyncio.sleep(0.3)
        still = (await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=parked.plan_id))).plan
        assert still.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL  # nothing ran meanwhile

        approved = await alice.ApprovePlan(
            plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id, reason="checked the node")
        )
        assert approved.plan.phase in (
            plan_pb2.PLAN_PHASE_APPROVED,
            plan_pb2.PLAN_PHASE_EXECUTING,
            plan_pb2.PLAN_PHASE_COMPLETED,
        )
        done = await wait_terminal(alice, parked.plan_id)
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await alice.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    assert phases(done) == [
        "PENDING", "VALIDATING", "AWAITING_APPROVAL", "APPROVED", "EXECUTING", "COMPLETED",
    ]  # fmt: skip
    approval = done.transitions[2]
    assert approval.actor == "spiffe://sentinel.local/operator/alice"
    assert "checked the node" in approval.reason
    # Sentinel's scheduling view now shows the node cordoned.
    assert cp.registry.get("node-a").cordoned


async def test_an_operator_may_not_approve_a_plan_they_submitted(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        policy_paths=write_policy(tmp_path / "p.yaml", APPROVAL_POLICY)
    )
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port, "operator", "bob") as bob:
        parked = (
            await bob.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["node-a"]), confidence=0.2))
            )
        ).plan
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await bob.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not approve" in (refused.value.details() or "")


async def test_request_id_replay_returns_the_same_plan_and_reuse_is_refused(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    request = plan_pb2.SubmitPlanRequest(
        plan=plan(step("run_diagnostic", ["node-a"])), request_id="replay-1"
    )
    async with plan_client(pki, cp.port) as planner:
        first = await planner.SubmitPlan(request)
        second = await planner.SubmitPlan(request)
        assert second.replayed and not first.replayed
        assert second.plan.plan_id == first.plan.plan_id
        listed = await planner.ListPlans(plan_pb2.ListPlansRequest())
        assert [p.plan_id for p in listed.plans] == [first.plan.plan_id]

        changed = plan_pb2.SubmitPlanRequest(
            plan=plan(step("cordon", ["node-a"])), request_id="replay-1"
        )
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await planner.SubmitPlan(changed)
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert first.plan.plan_id in (reused.value.details() or "")


async def test_validate_only_gives_the_verdict_and_preview_and_stores_nothing(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    await agent_factory("node-c", cp.port)
    async with plan_client(pki, cp.port) as planner:
        response = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("set_telemetry_interval", ["node-a", "node-b", "node-c"], {"seconds": 5}),
                    parallel=2,
                ),
                validate_only=True,
            )
        )
        listed = await planner.ListPlans(plan_pb2.ListPlansRequest())
    assert response.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
    assert response.plan.plan_id == ""
    assert [(c.node_id, c.wave) for c in response.preview] == [
        ("node-a", 0),
        ("node-b", 0),
        ("node-c", 1),
    ]
    assert response.preview[2].summary == "set_telemetry_interval on node-c seconds=5.0"
    assert list(listed.plans) == []


async def test_a_step_failing_on_one_node_rolls_back_the_others(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    a = await agent_factory("node-a", cp.port)
    b = await agent_factory("node-b", cp.port)
    await b.stop()  # registered, but away when its turn comes: its command expires
    before = a.agent._interval()
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step(
                        "set_telemetry_interval", ["node-a", "node-b"], {"seconds": 9}, timeout_s=1
                    )
                )
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)

    assert phases(done)[-2:] == ["ROLLING_BACK", "ROLLED_BACK"], done.status_message
    results = {r.node_id: r for r in done.steps[0].node_results}
    assert results["node-b"].outcome == "EXPIRED"
    assert results["node-a"].outcome == "SUCCEEDED"
    assert results["node-a"].rollback_outcome == "SUCCEEDED"
    assert results["node-a"].state == plan_pb2.STEP_STATE_ROLLED_BACK
    assert "node-b" in done.status_message
    assert a.agent._interval() == before


async def test_watch_plan_sees_every_transition_in_order_and_late_watchers_get_the_state(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", ["node-a"])))
        )
        plan_id = submitted.plan.plan_id
        seen: list[str] = []
        first = None
        async for event in planner.WatchPlan(plan_pb2.WatchPlanRequest(plan_id=plan_id)):
            first = first or event
            if event.HasField("transition"):
                seen.append(plan_pb2.PlanPhase.Name(event.transition.to_phase))
        assert first is not None and first.plan.plan_id == plan_id
        # The stream ends by itself at the terminal phase; the transitions before the watch
        # began are in the first message's plan, the rest arrived one by one, in order.
        already = [plan_pb2.PlanPhase.Name(t.to_phase) for t in first.plan.transitions]
        assert [p.removeprefix("PLAN_PHASE_") for p in already + seen] == [
            "VALIDATING", "APPROVED", "EXECUTING", "COMPLETED",
        ]  # fmt: skip

        late = [e async for e in planner.WatchPlan(plan_pb2.WatchPlanRequest(plan_id=plan_id))]
        assert len(late) == 1 and late[0].plan.phase == plan_pb2.PLAN_PHASE_COMPLETED

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            async for _ in planner.WatchPlan(plan_pb2.WatchPlanRequest(plan_id="plan-nope")):
                pass
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_a_waiting_plan_and_a_finished_plan_cannot_be_cancelled(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        policy_paths=write_policy(tmp_path / "p.yaml", APPROVAL_POLICY)
    )
    await agent_factory("node-a", cp.port)
    async with (
        plan_client(pki, cp.port) as planner,
        plan_client(pki, cp.port, "operator", "alice") as alice,
    ):
        parked = (
            await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["node-a"]), confidence=0.1))
            )
        ).plan
        cancelled = await planner.CancelPlan(
            plan_pb2.CancelPlanRequest(plan_id=parked.plan_id, reason="superseded")
        )
        assert cancelled.plan.phase == plan_pb2.PLAN_PHASE_CANCELLED
        assert "superseded" in cancelled.plan.transitions[-1].reason
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await planner.CancelPlan(plan_pb2.CancelPlanRequest(plan_id=parked.plan_id))
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await alice.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The same plan, approved, does cordon the node: what the cancel prevented.
        control = await _cordon_of_node_a_approved_by(planner, alice)
        stored = (await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=parked.plan_id))).plan
    assert phases(stored) == ["PENDING", "VALIDATING", "AWAITING_APPROVAL", "CANCELLED"]
    assert await _node_commands(cp, "node-a") == [(control, "cordon")]
    assert cp.registry.get("node-a").cordoned  # by the control, the one cordon that ran


async def test_an_expired_plan_never_starts(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        policy_paths=write_policy(tmp_path / "p.yaml", APPROVAL_POLICY)
    )
    await agent_factory("node-a", cp.port)
    async with (
        plan_client(pki, cp.port) as planner,
        plan_client(pki, cp.port, "operator", "alice") as alice,
    ):
        parked = (
            await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(
                    plan=plan(step("cordon", ["node-a"]), confidence=0.1, expire_in_s=1.0)
                )
            )
        ).plan
        done = await wait_terminal(planner, parked.plan_id)
        assert done.phase == plan_pb2.PLAN_PHASE_CANCELLED
        assert "expired" in done.status_message
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await alice.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        with pytest.raises(grpc.aio.AioRpcError) as past:
            await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["node-a"]), expire_in_s=-5.0))
            )
        assert past.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "plan.expire_time" in (past.value.details() or "")
        # The same plan, approved in time, does cordon the node: what the expiry prevented.
        control = await _cordon_of_node_a_approved_by(planner, alice)
    assert phases(done) == ["PENDING", "VALIDATING", "AWAITING_APPROVAL", "CANCELLED"]
    assert done.transitions[-1].actor == "pipeline-controller"
    assert await _node_commands(cp, "node-a") == [(control, "cordon")]
    assert cp.registry.get("node-a").cordoned  # by the control, the one cordon that ran


async def test_a_health_gate_without_fresh_data_is_inconclusive_and_rolls_back(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    # Agents are told to send telemetry every 60 s: after the step, no fresh sample can reach
    # the gate within its 1 s window, and "no data" must not count as healthy.
    cp = await control_plane_factory(telemetry_interval_s=60.0)
    a = await agent_factory("node-a", cp.port, wait_connected=False)
    # The welcome switches the agent to 60 s; the one collection that ends after it (the
    # wake-up, or the one under way at that moment) is its last for a minute.
    after_welcome: list[int] = []
    a.agent.on_sample = lambda sample: (
        after_welcome.append(sample.seq) if a.agent.connected.is_set() else None
    )
    await asyncio.wait_for(a.agent.connected.wait(), 10)
    [last] = await eventually(lambda: list(after_welcome))
    await eventually(lambda: (latest := cp.hub.latest("node-a")) and latest.seq == last)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("cordon", ["node-a"]), gates=[("alive", "sample.seq > 0", 1.0)])
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert after_welcome == [last]  # no sample was taken while the gate waited
    assert done.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK, done.status_message
    assert "inconclusive" in done.status_message
    assert done.steps[0].node_results[0].rollback_outcome == "SUCCEEDED"
    assert not cp.registry.get("node-a").cordoned


async def test_a_failing_health_gate_rolls_back(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    no_nvidia_driver: FakeNvml,
) -> None:
    # The node reports no GPUs (no driver, whatever this machine has): the gate fails on it.
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("cordon", ["node-a"]),
                    gates=[("needs-gpus", "size(sample.gpus) > 0", 5.0)],
                )
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK
    assert "needs-gpus" in done.status_message and "failed on node-a" in done.status_message
    result = done.steps[0].node_results[0]
    assert result.rollback_outcome == "SUCCEEDED"
    await eventually(lambda: not cp.registry.get("node-a").cordoned)


async def test_bad_plans_are_refused_with_every_field_path(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    bad = plan(
        step("set_telemetry_interval", ["node-a", "node-a"], {"seconds": "fast"}),
        step("scale", ["node-a"]),
        step("reboot", ["ghost"]),
        confidence=1.5,
    )
    bad.source = ""
    async with plan_client(pki, cp.port) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=bad))
        listed = await planner.ListPlans(plan_pb2.ListPlansRequest())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    for path in (
        "plan.source",
        "plan.confidence",
        "plan.steps[0].targets[1].node_id",
        "plan.steps[0].parameters.seconds",
        "plan.steps[1].action",
        "plan.steps[2].action",
    ):
        assert path in details, path
    assert "Kubernetes executor" in details
    assert list(listed.plans) == []


async def test_list_plans_filters_by_phase_source_and_target_and_pages(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    async with plan_client(pki, cp.port) as planner:
        ids = []
        for node in ("node-a", "node-b", "node-a"):
            response = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", [node])))
            )
            ids.append(response.plan.plan_id)
        for plan_id in ids:
            await wait_terminal(planner, plan_id)
        on_a = await planner.ListPlans(plan_pb2.ListPlansRequest(target="node-a"))
        assert [p.plan_id for p in on_a.plans] == [ids[0], ids[2]]
        done = await planner.ListPlans(
            plan_pb2.ListPlansRequest(phase=plan_pb2.PLAN_PHASE_COMPLETED, source="inframind")
        )
        assert len(done.plans) == 3
        paged: list[str] = []
        token = ""
        while True:
            page = await planner.ListPlans(plan_pb2.ListPlansRequest(page_size=2, page_token=token))
            paged += [p.plan_id for p in page.plans]
            token = page.next_page_token
            if not token:
                break
        assert paged == ids
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await planner.ListPlans(plan_pb2.ListPlansRequest(page_token="garbage"))
        assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_plan_transitions_are_in_the_audit_log(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", ["node-a"])))
        )
        await wait_terminal(planner, submitted.plan.plan_id)
    async with grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("operator", "alice")
    ) as channel:
        events = await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(target=f"plan/{submitted.plan.plan_id}")
        )
    outcomes = sorted(e.outcome for e in events.events if e.method == "plan.transition")
    assert outcomes == sorted(["VALIDATING", "APPROVED", "EXECUTING", "COMPLETED"])
    # The submission itself is filed under the plan it created.
    submitted_events = [e for e in events.events if e.method.endswith("PlanService/SubmitPlan")]
    assert [(e.outcome, e.principal) for e in submitted_events] == [
        ("OK", "spiffe://sentinel.local/planner/inframind")
    ]


async def test_gpu_power_limit_plan_failing_on_one_node_restores_the_other_nodes_gpus(
    monkeypatch: pytest.MonkeyPatch,
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    # Only the GPU is faked (NVML's functions in the real pynvml module); both in-process
    # agents see the same two boards, which makes "restored" easy to observe.
    nvml = FakeNvml([h100(0), h100(1)])
    nvml.install(monkeypatch)
    cp = await control_plane_factory()
    await agent_factory("gpu-a", cp.port)
    await agent_factory("gpu-b", cp.port)
    capped = plan(
        step("set_gpu_power_limit", ["gpu-a"], {"watts": 250}, step_id="cap-a"),
        # 900 W is beyond these boards' 700 W maximum: the agent refuses it.
        step("set_gpu_power_limit", ["gpu-b"], {"watts": 900}, step_id="cap-b"),
    )
    # The boards are shared: gpu-a's cap shows on gpu-b too, which the stale-plan guard would
    # (rightly) call drift before cap-b; this test is about the agent's refusal.
    capped.allow_drift.append("gpu.*.power_limit_watts")
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=capped))
        done = await wait_terminal(planner, submitted.plan.plan_id)

    assert phases(done)[-2:] == ["ROLLING_BACK", "ROLLED_BACK"], done.status_message
    first, second = done.steps
    assert second.node_results[0].outcome == "INVALID_ARGUMENT"
    assert "700" in second.node_results[0].message
    assert first.state == plan_pb2.STEP_STATE_ROLLED_BACK
    output = json_format.MessageToDict(first.node_results[0].output)
    assert [g["previous_watts"] for g in output["gpus"]] == [700.0, 700.0]
    assert first.node_results[0].rollback_outcome == "SUCCEEDED"
    # Capped to 250 W, then put back to 700 W: what the GPUs ran with before the plan.
    assert nvml.power_limit_sets == [(0, 250_000), (1, 250_000), (0, 700_000), (1, 700_000)]
    assert [g.power_limit for g in nvml.gpus] == [700_000, 700_000]


async def test_sentinelctl_submits_lists_watches_and_shows_a_plan(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-1", cp.port)
    pki.client("operator", "admin")
    example = pathlib.Path(__file__).parents[2] / "deploy/examples/plan-telemetry-interval.json"
    base = [
        "--server", f"localhost:{cp.port}", "--certs-dir", str(pki.directory),
        "--identity", "operator-admin",
    ]  # fmt: skip

    def ctl(*args: str) -> int:
        return ctl_main([*base, *args])

    assert await asyncio.to_thread(ctl, "submit", str(example), "--validate-only") == 0
    out = capsys.readouterr().out
    assert "(not stored) would be APPROVED" in out
    assert "step 0 wave 0: set_telemetry_interval on node-1" in out

    assert await asyncio.to_thread(ctl, "submit", str(example)) == 0
    plan_id = capsys.readouterr().out.split()[1]
    assert await asyncio.to_thread(ctl, "watch", plan_id) == 0
    watched = capsys.readouterr().out
    assert "EXECUTING -> COMPLETED" in watched and watched.rstrip().endswith("plan finished")
    assert await asyncio.to_thread(ctl, "plans", "--phase", "completed") == 0
    assert plan_id in capsys.readouterr().out
    assert await asyncio.to_thread(ctl, "cancel", plan_id) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err

    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": "not a list"}')
    assert await asyncio.to_thread(ctl, "submit", str(broken)) == 2
    assert "not a sentinel.v1.Plan" in capsys.readouterr().err


async def test_cancelling_a_running_plan_withdraws_undelivered_commands_and_rolls_back(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    a = await agent_factory("node-a", cp.port)
    b = await agent_factory("node-b", cp.port)
    await b.stop()  # away: its command waits in the ledger
    before = a.agent._interval()
    async with (
        plan_client(pki, cp.port) as planner,
        plan_client(pki, cp.port, "operator", "alice") as alice,
    ):
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step(
                        "set_telemetry_interval", ["node-a", "node-b"], {"seconds": 8}, timeout_s=60
                    ),
                    parallel=2,
                )
            )
        )
        plan_id = submitted.plan.plan_id
        await eventually(lambda: a.agent._interval() == 8.0)
        requested = await alice.CancelPlan(
            plan_pb2.CancelPlanRequest(plan_id=plan_id, reason="wrong rack")
        )
        assert requested.plan.phase == plan_pb2.PLAN_PHASE_EXECUTING
        assert "cancel requested" in requested.plan.status_message
        done = await wait_terminal(planner, plan_id, timeout=15)

    assert phases(done)[-2:] == ["ROLLING_BACK", "ROLLED_BACK"], done.status_message
    assert "wrong rack" in done.transitions[-2].reason
    results = {r.node_id: r for r in done.steps[0].node_results}
    assert results["node-b"].outcome == "CANCELLED"
    assert results["node-a"].rollback_outcome == "SUCCEEDED"
    assert a.agent._interval() == before
    # node-b comes back later: the withdrawn command is never delivered to it.
    seq_before = cp.registry.get("node-b").last_telemetry_seq
    b2 = await agent_factory("node-b", cp.port)
    # A session re-sends the node's unfinished commands before it reads anything from the
    # agent, so a sample stored from the new session means redelivery is over; the agent runs
    # commands in order, so the ping's answer means whatever came before it has run.
    await eventually(lambda: cp.registry.get("node-b").last_telemetry_seq > seq_before)
    ping = await cp.commands.send("node-b", "ping", {}, timeout=10)
    assert ping.succeeded
    assert b2.agent._interval() == before
    assert await _node_commands(cp, "node-b") == [
        (plan_id, "set_telemetry_interval"),
        ("", "ping"),
    ]
    assert await _deliveries(cp, "node-b") == [0, 1]


async def test_plan_metrics_are_exported(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(policy_paths=write_policy(tmp_path / "p.yaml", STRICT_POLICY))
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        done = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", ["node-a"])))
        )
        await wait_terminal(planner, done.plan.plan_id)
        await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["node-a"]), confidence=0.1))
        )

    def completed_counted() -> dict[str, float] | None:
        metrics = scrape_metrics(cp.metrics_port)
        return metrics if metrics.get('sentinel_plans{"phase": "completed"}') == 1 else None

    metrics = await eventually(lambda: asyncio.to_thread(completed_counted))
    assert metrics['sentinel_plans{"phase": "rejected"}'] == 1
    assert metrics['sentinel_plan_transitions_total{"phase": "completed"}'] == 1
    step_count = 'sentinel_plan_step_duration_seconds_count{"action": "run_diagnostic", '
    assert metrics[step_count + '"result": "succeeded"}'] == 1
    assert metrics["sentinel_policy_evaluation_seconds_count{}"] == 2
    rule = 'sentinel_policy_violations_total{"effect": "REJECT", "rule": "minimum-confidence"}'
    assert metrics[rule] == 1
