"""Kubernetes steps through the public API: a control plane configured with clusters (the
`kubernetes_clusters` setting, kubeconfig contexts pointing at Kubernetes API test servers)
takes a plan over gRPC, carries it out on the cluster, and shows each cluster's reachability
and API latency on /metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from sentinel.v1 import audit_pb2, audit_pb2_grpc, plan_pb2

from tests.analysis.conftest import RunningPrometheus, prometheus  # noqa: F401 (fixture)
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki
from tests.executors.conftest import NAMESPACE
from tests.kubeapi import KubeApiServer, write_kubeconfig
from tests.kubeapi.objects import deployment
from tests.plan_helpers import plan_client, wait_terminal
from tests.telemetry.test_metrics import scrape


def _scale_step(cluster: str, name: str, replicas: int) -> plan_pb2.PlanStep:
    step = plan_pb2.PlanStep(action="scale")
    step.targets.add().kubernetes.CopyFrom(
        plan_pb2.KubernetesObject(
            cluster=cluster, namespace=NAMESPACE, kind="Deployment", name=name
        )
    )
    parameters = struct_pb2.Struct()
    parameters.update({"replicas": replicas})
    step.parameters.CopyFrom(parameters)
    step.timeout.FromTimedelta(dt.timedelta(seconds=20))
    return step


async def audit_events(pki: Pki, port: int, method: str) -> list[audit_pb2.AuditEvent]:
    """The audit events of `method`, as an operator lists them, once some are there."""
    async with grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials("operator", "auditor")
    ) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for _ in range(100):  # the audit log is written in the background
            response = await stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(method=method))
            if response.events:
                return list(response.events)
            await asyncio.sleep(0.05)
    return []


def _plan(*steps: plan_pb2.PlanStep) -> plan_pb2.Plan:
    return plan_pb2.Plan(source="inframind", rationale="test", confidence=0.95, steps=list(steps))


async def test_a_plan_scales_a_deployment_on_a_configured_cluster(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    kube: KubeApiServer,
    kube_b: KubeApiServer,
    kubeconfig: pathlib.Path,
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    cp = await control_plane_factory(
        kubernetes_clusters=f"lab={kubeconfig}#lab,edge={kubeconfig}#edge",
        kubernetes_probe_interval_s=0.2,
    )
    kube_b.stop()
    async with plan_client(pki, cp.port) as planner:
        dry = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=_plan(_scale_step("lab", "llm", 3)), validate_only=True)
        )
        assert [c.summary for c in dry.preview] == [
            "scale Deployment models/llm in cluster lab to 3 replicas"
        ]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=_plan(_scale_step("prod", "llm", 3)))
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "plan.steps[0].targets[0].kubernetes.cluster: unknown cluster 'prod'" in (
            refused.value.details() or ""
        )
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=_plan(_scale_step("lab", "llm", 3)))
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None and stored["spec"]["replicas"] == 3

    async def reachability() -> dict[str, float]:
        while True:
            values = await scrape(cp.metrics_port)
            up = {
                dict(labels)["cluster"]: value
                for (name, labels), value in values.items()
                if name == "sentinel_kubernetes_cluster_reachable"
            }
            if up.get("edge") == 0.0 and up.get("lab") == 1.0:
                return up
            await asyncio.sleep(0.1)

    assert await asyncio.wait_for(reachability(), 10) == {"lab": 1.0, "edge": 0.0}
    values = await scrape(cp.metrics_port)
    counts = {
        dict(labels)["verb"]
        for (name, labels), value in values.items()
        if name == "sentinel_kubernetes_api_request_seconds_count"
        and dict(labels)["cluster"] == "lab"
        and value > 0
    }
    assert {"get", "update", "version"} <= counts


async def test_a_bad_cluster_setting_stops_the_control_plane_with_the_reason(
    control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(ValueError, match="is not NAME=KUBECONFIG"):
        await control_plane_factory(kubernetes_clusters="lab")
    with pytest.raises(ValueError, match="no kubeconfig file at"):
        await control_plane_factory(kubernetes_clusters=f"lab={tmp_path / 'missing'}")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"lab": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="cluster lab: cannot load its configuration"):
        await control_plane_factory(kubernetes_clusters=f"lab={kubeconfig}#no-such-context")


async def test_the_readme_canary_example_is_a_valid_plan_with_a_dry_run(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    kube: KubeApiServer,
    kubeconfig: pathlib.Path,
) -> None:
    kube.cluster.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "inference"}})
    kube.cluster.put(
        deployment(
            "llm-server",
            namespace="inference",
            replicas=4,
            image="ghcr.io/example/llm-server:2.0",
            container="llm-server",
        )
    )
    example = pathlib.Path(__file__).parents[2] / "deploy/examples/plan-canary-rollout.json"
    draft = json_format.Parse(example.read_text(), plan_pb2.Plan())
    cp = await control_plane_factory(kubernetes_clusters=f"kind={kubeconfig}#lab")
    async with plan_client(pki, cp.port) as planner:
        response = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=draft, validate_only=True)
        )
    assert response.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
    (command,) = response.preview
    assert command.dry_run_error == ""
    assert [(c.field, c.before, c.after) for c in command.changes] == [
        (
            "containers.llm-server.image",
            "ghcr.io/example/llm-server:2.0",
            "ghcr.io/example/llm-server:2.1",
        ),
        (
            "Deployment inference/llm-server-canary",
            "absent",
            "created during the rollout, removed at its end",
        ),
    ]


async def test_prometheus_gate_measurements_are_shown_by_get_plan_and_audited(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    kube: KubeApiServer,
    kubeconfig: pathlib.Path,
    prometheus: RunningPrometheus,  # noqa: F811
) -> None:
    await prometheus.set_value("service-gate", 0.5)
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    cp = await control_plane_factory(
        kubernetes_clusters=f"lab={kubeconfig}#lab", audit_flush_interval_s=0.05
    )
    draft = _plan(_scale_step("lab", "llm", 2))
    gate = draft.health_gates.add(name="errors")
    gate.prometheus.address = prometheus.address
    gate.prometheus.query = 'gate_test_value{case="service-gate"}'
    gate.prometheus.success_condition = "result[0] < 1.0"
    gate.prometheus.count = 1
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=draft))
        done = await wait_terminal(planner, submitted.plan.plan_id)
        shown = await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=done.plan_id))
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    [measurement] = shown.plan.measurements
    assert (measurement.gate, measurement.point, measurement.verdict) == (
        "errors",
        "after wave 0",
        "PASSED",
    )
    assert [v.number_value for v in measurement.value.list_value.values] == [0.5]
    events = await audit_events(pki, cp.port, method="plan.analysis")
    assert [(e.target, e.outcome) for e in events] == [(f"plan/{done.plan_id}", "PASSED")]
    assert json.loads(events[0].detail)["query"] == 'gate_test_value{case="service-gate"}'


async def test_a_telemetry_gate_judges_a_rollout_by_the_agents_of_the_nodes_its_pods_run_on(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    kube: KubeApiServer,
    kubeconfig: pathlib.Path,
) -> None:
    # Agents on Kubernetes nodes gpu-0 and gpu-1 (gpu-2 has none); pods are spread over all
    # three, so a gate over them can only be judged once gpu-2 is cordoned out of placement.
    kube.cluster.update(
        "Node", None, "gpu-2", lambda node: node["spec"].__setitem__("unschedulable", True)
    )
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    cp = await control_plane_factory(kubernetes_clusters=f"lab={kubeconfig}#lab")
    await agent_factory("node-a", cp.port, kubernetes_node_name="gpu-0")
    await agent_factory("node-b", cp.port, kubernetes_node_name="gpu-1")

    def rollout(image: str, gate: str) -> plan_pb2.Plan:
        step = plan_pb2.PlanStep(action="rollout")
        step.targets.add().kubernetes.CopyFrom(
            plan_pb2.KubernetesObject(
                cluster="lab", namespace=NAMESPACE, kind="Deployment", name="llm"
            )
        )
        step.parameters.update({"container": "main", "image": image})
        step.timeout.FromTimedelta(dt.timedelta(seconds=30))
        draft = _plan(step)
        added = draft.health_gates.add(name="gpu-nodes", expression=gate)
        added.window.FromTimedelta(dt.timedelta(seconds=10))
        return draft

    async with plan_client(pki, cp.port) as planner:
        healthy = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=rollout("repo/llm:2", "sample.seq > 0"))
        )
        done = await wait_terminal(planner, healthy.plan.plan_id)
        assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
        picky = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=rollout("repo/llm:3", "node_id != 'node-b'"))
        )
        refused = await wait_terminal(planner, picky.plan.plan_id)
    assert refused.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK, refused.status_message
    assert "health gate 'gpu-nodes' failed on node-b" in refused.status_message
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == "repo/llm:2"
