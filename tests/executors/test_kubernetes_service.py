"""Kubernetes steps through the public API: a control plane configured with clusters (the
`kubernetes_clusters` setting, kubeconfig contexts pointing at Kubernetes API test servers)
takes a plan over gRPC, carries it out on the cluster, and shows each cluster's reachability
and API latency on /metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from sentinel.v1 import plan_pb2

from tests.conftest import ControlPlaneFactory, Pki
from tests.executors.conftest import NAMESPACE
from tests.kubeapi import KubeApiServer
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
