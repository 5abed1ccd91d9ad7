"""The stale-plan guard end to end, with a real control plane and agents over fake NVML: the
state of every target is recorded when a plan is judged; a target that drifted before its step
fails the plan without being touched (unless the plan allows that drift); preconditions refuse a
submission or an approval when they do not hold; bad preconditions and drift patterns are
refused with their field paths."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sentinel.v1 import plan_pb2, plan_pb2_grpc

from controlplane import ControlPlane
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.executors.conftest import NAMESPACE, kube, kube_b, kubeconfig  # noqa: F401 (fixtures)
from tests.fakenvml import FakeNvml, h100
from tests.kubeapi import KubeApiServer
from tests.kubeapi.objects import deployment
from tests.plan_helpers import (
    APPROVAL_POLICY,
    plan,
    plan_client,
    step,
    wait_terminal,
    write_policy,
)

pytestmark = pytest.mark.timeout(60)


def _reported_limits(cp: ControlPlane, node_id: str) -> list[int] | None:
    """The GPU power limits (mW) in the node's newest sample, as its agent reported them."""
    sample = cp.relay.latest(node_id)
    if sample is None:
        return None
    return [gpu.power_limit_milliwatts for gpu in sample.payload.gpus]


async def _reported(cp: ControlPlane, node_id: str, limits: list[int]) -> None:
    await eventually(lambda: _reported_limits(cp, node_id) == limits)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    # Both in-process agents see the same two boards (the fake replaces NVML's functions).
    fake = FakeNvml([h100(0), h100(1)])
    fake.install(monkeypatch)
    return fake


async def _drift_before_the_step(
    pki: Pki,
    cp: ControlPlane,
    agent_factory: AgentFactory,
    nvml: FakeNvml,
    allow_drift: list[str],
) -> plan_pb2.Plan:
    """A plan whose first step waits for node-a (its agent is down) while someone else changes
    GPU 0's power limit to 500 W; its second step sets node-b's GPUs to 300 W. Returns the plan
    as it ended."""
    a = await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    await _reported(cp, "node-b", [700_000, 700_000])
    await a.stop()
    message = plan(
        step("set_telemetry_interval", ["node-a"], {"seconds": 3}, timeout_s=20, step_id="wait"),
        step("set_gpu_power_limit", ["node-b"], {"watts": 300}, step_id="cap"),
    )
    message.allow_drift.extend(allow_drift)
    async with plan_client(pki, cp.port) as planner:
        submitted = (await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))).plan
        recorded = {s.target: dict(s.fields) for s in submitted.recorded_state}
        assert recorded == {
            "node-b": {"gpu.0.power_limit_watts": "700", "gpu.1.power_limit_watts": "700"}
        }
        nvml.gpus[0].power_limit = 500_000  # an operator's nvidia-smi, outside Sentinel
        await _reported(cp, "node-b", [500_000, 700_000])
        await agent_factory("node-a", cp.port)  # step 1 gets its node; step 2 comes next
        return await wait_terminal(planner, submitted.plan_id)


async def test_a_target_changed_after_validation_fails_the_plan_as_stale_and_is_not_touched(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: FakeNvml,
) -> None:
    cp = await control_plane_factory()
    done = await _drift_before_the_step(pki, cp, agent_factory, nvml, allow_drift=[])

    assert done.phase in (plan_pb2.PLAN_PHASE_ROLLED_BACK, plan_pb2.PLAN_PHASE_FAILED)
    stale = "stale: node-b gpu.0.power_limit_watts was 700 at validation, is 500 now"
    assert done.status_message == stale
    assert done.steps[1].state == plan_pb2.STEP_STATE_FAILED
    assert done.steps[1].message == stale
    assert list(done.steps[1].node_results) == []  # never sent to node-b
    # Nothing set the GPUs: they are as the other party left them, and node-b reports that.
    assert nvml.power_limit_sets == []
    assert [gpu.power_limit for gpu in nvml.gpus] == [500_000, 700_000]
    await _reported(cp, "node-b", [500_000, 700_000])


async def test_a_plan_allowing_the_drift_runs(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: FakeNvml,
) -> None:
    cp = await control_plane_factory()
    done = await _drift_before_the_step(
        pki, cp, agent_factory, nvml, allow_drift=["gpu.*.power_limit_watts"]
    )

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert [gpu.power_limit for gpu in nvml.gpus] == [300_000, 300_000]
    await _reported(cp, "node-b", [300_000, 300_000])
    # After its step, the target's recorded state is what the plan left it in.
    recorded = {s.target: dict(s.fields) for s in done.recorded_state}
    assert recorded["node-b"] == {
        "gpu.0.power_limit_watts": "300",
        "gpu.1.power_limit_watts": "300",
    }


async def test_the_plans_own_change_is_not_drift_for_its_later_steps(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: FakeNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-b", cp.port)
    await _reported(cp, "node-b", [700_000, 700_000])
    message = plan(
        step("set_gpu_power_limit", ["node-b"], {"watts": 400}, step_id="first"),
        # Right after the first step: telemetry may not show 400 W yet.
        step("set_gpu_power_limit", ["node-b"], {"watts": 350, "gpus": [1]}, step_id="second"),
    )
    async with plan_client(pki, cp.port) as planner:
        submitted = (await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))).plan
        done = await wait_terminal(planner, submitted.plan_id)

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert [gpu.power_limit for gpu in nvml.gpus] == [400_000, 350_000]


async def test_a_false_precondition_refuses_the_submission_naming_it(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: FakeNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-b", cp.port)
    await _reported(cp, "node-b", [700_000, 700_000])
    message = plan(step("set_gpu_power_limit", ["node-b"], {"watts": 300}))
    message.preconditions.add(
        name="uncapped", expression="sample.gpus.all(g, g.power_limit_milliwatts >= 600000)"
    )
    message.preconditions.add(
        name="already-low", expression='double(state["gpu.0.power_limit_watts"]) <= 400.0'
    )
    async with plan_client(pki, cp.port) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))
        listed = await planner.ListPlans(plan_pb2.ListPlansRequest())

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == (
        "plan.preconditions[1]: precondition already-low does not hold on node-b"
    )
    assert list(listed.plans) == []
    assert nvml.power_limit_sets == []


async def test_approval_is_refused_while_a_precondition_no_longer_holds(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: FakeNvml,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        policy_paths=write_policy(tmp_path / "p.yaml", APPROVAL_POLICY)
    )
    await agent_factory("node-b", cp.port)
    await _reported(cp, "node-b", [700_000, 700_000])
    message = plan(step("set_gpu_power_limit", ["node-b"], {"watts": 300}), confidence=0.5)
    message.preconditions.add(
        name="uncapped", expression='double(state["gpu.0.power_limit_watts"]) >= 600.0'
    )
    async with (
        plan_client(pki, cp.port) as planner,
        plan_client(pki, cp.port, "operator", "alice") as alice,
    ):
        parked = (await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))).plan
        assert parked.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
        nvml.gpus[0].power_limit = 500_000
        await _reported(cp, "node-b", [500_000, 700_000])

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await alice.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == (
            "plan.preconditions[0]: precondition uncapped does not hold on node-b"
        )
        await asyncio.sleep(0.3)
        still = (await alice.GetPlan(plan_pb2.GetPlanRequest(plan_id=parked.plan_id))).plan
        assert still.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
        assert nvml.power_limit_sets == []

        # Once it holds again, approval records the state now and the plan runs.
        nvml.gpus[0].power_limit = 650_000
        await _reported(cp, "node-b", [650_000, 700_000])
        approved = (
            await alice.ApprovePlan(plan_pb2.ApprovePlanRequest(plan_id=parked.plan_id))
        ).plan
        at_approval = {s.target: dict(s.fields) for s in approved.recorded_state}
        assert at_approval["node-b"]["gpu.0.power_limit_watts"] == "650"
        done = await wait_terminal(alice, parked.plan_id)

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert [gpu.power_limit for gpu in nvml.gpus] == [300_000, 300_000]


async def test_bad_preconditions_and_drift_patterns_are_refused_with_their_paths(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    message = plan(step("cordon", ["node-a"]))
    message.preconditions.add(name="syntax", expression="state[")
    message.preconditions.add(name="unknown", expression="plan.confidence > 0.5")
    message.preconditions.add(name="", expression="true")
    message.preconditions.add(name="syntax", expression="")
    message.allow_drift.extend(["gpu.*", "", "power limit"])
    stub: plan_pb2_grpc.PlanServiceStub
    async with plan_client(pki, cp.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    for path in (
        "plan.preconditions[0].expression",
        "plan.preconditions[1].expression: unknown variable(s) plan",
        "plan.preconditions[2].name",
        "plan.preconditions[3].name: duplicate of preconditions[0]",
        "plan.preconditions[3].expression: required",
        "plan.allow_drift[1]",
        "plan.allow_drift[2]",
    ):
        assert path in details, path
    assert "plan.allow_drift[0]" not in details


async def test_a_cordon_records_the_registrys_view_and_refuses_drift(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    a = await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    await a.stop()
    message = plan(
        step("set_telemetry_interval", ["node-a"], {"seconds": 3}, timeout_s=20, step_id="wait"),
        step("cordon", ["node-b"], step_id="cordon"),
    )
    async with plan_client(pki, cp.port) as planner:
        submitted = (await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))).plan
        recorded = {s.target: dict(s.fields) for s in submitted.recorded_state}
        assert recorded == {"node-b": {"cordoned": "false"}}
        await cp.registry.set_cordoned("node-b", True)  # someone else cordoned it meanwhile
        await agent_factory("node-a", cp.port)
        done = await wait_terminal(planner, submitted.plan_id)

    assert done.status_message == "stale: node-b cordoned was false at validation, is true now"
    assert list(done.steps[1].node_results) == []


async def test_a_deployment_edited_after_validation_fails_the_plan_as_stale(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    kube: KubeApiServer,  # noqa: F811 (fixture)
    kubeconfig: pathlib.Path,  # noqa: F811 (fixture)
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    cp = await control_plane_factory(kubernetes_clusters=f"lab={kubeconfig}#lab")
    a = await agent_factory("node-a", cp.port)
    await a.stop()
    scale = plan_pb2.PlanStep(step_id="scale", action="scale")
    scale.targets.add().kubernetes.CopyFrom(
        plan_pb2.KubernetesObject(cluster="lab", namespace=NAMESPACE, kind="Deployment", name="llm")
    )
    parameters = struct_pb2.Struct()
    parameters.update({"replicas": 3})
    scale.parameters.CopyFrom(parameters)
    scale.timeout.FromTimedelta(dt.timedelta(seconds=20))
    message = plan(
        step("set_telemetry_interval", ["node-a"], {"seconds": 3}, timeout_s=20, step_id="wait"),
        scale,
    )
    key = f"k8s/lab/{NAMESPACE}/Deployment/llm"
    async with plan_client(pki, cp.port) as planner:
        submitted = (await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))).plan
        recorded = {s.target: dict(s.fields) for s in submitted.recorded_state}
        assert recorded[key]["spec.replicas"] == "1"
        assert recorded[key]["generation"] == "1"
        assert recorded[key]["resource_version"]

        def edit(obj: dict[str, Any]) -> None:
            obj["spec"]["replicas"] = 2  # someone else scaled it meanwhile

        kube.cluster.update("Deployment", NAMESPACE, "llm", edit)
        await agent_factory("node-a", cp.port)
        done = await wait_terminal(planner, submitted.plan_id)

    assert f"stale: {key} generation was 1 at validation, is 2 now" in done.status_message
    assert f"stale: {key} spec.replicas was 1 at validation, is 2 now" in done.status_message
    assert "resource_version" not in done.status_message
    assert list(done.steps[1].node_results) == []
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None and stored["spec"]["replicas"] == 2
