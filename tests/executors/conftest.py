"""Fixtures for executor tests: Kubernetes API test servers (tests/kubeapi: the real REST paths
and JSON, since no real API server can run here) with a kubeconfig naming each as a cluster, and
the plan desk and pipeline controller driving the real executors on a real store — no gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane.executors import (
    ClusterSpec,
    Executors,
    KubeClusters,
    KubernetesExecutor,
    KubernetesObject,
    Target,
)
from controlplane.plans import (
    FleetView,
    HealthGates,
    Lease,
    Limits,
    PipelineController,
    Plan,
    PlanDesk,
    PlanLimitsConfig,
    Step,
)
from controlplane.policy import PolicyEngine
from controlplane.store import Store
from controlplane.telemetry import Sample
from tests.kubeapi import KubeApiServer, write_kubeconfig

NAMESPACE = "models"


@pytest.fixture
def kube() -> Iterator[KubeApiServer]:
    """Cluster `lab`: three schedulable nodes and the `models` namespace."""
    with KubeApiServer(tick_seconds=0.05) as server:
        for index in range(3):
            server.cluster.add_node(f"gpu-{index}")
        server.cluster.put(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        yield server


@pytest.fixture
def kube_b() -> Iterator[KubeApiServer]:
    """Cluster `edge`, a second API server."""
    with KubeApiServer(tick_seconds=0.05) as server:
        server.cluster.add_node("edge-0")
        server.cluster.put(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        yield server


@pytest.fixture
def kubeconfig(kube: KubeApiServer, kube_b: KubeApiServer, tmp_path: pathlib.Path) -> pathlib.Path:
    return write_kubeconfig(tmp_path / "kubeconfig", {"lab": kube.url, "edge": kube_b.url})


@pytest.fixture
def clusters(kubeconfig: pathlib.Path) -> Iterator[KubeClusters]:
    specs = [
        ClusterSpec("lab", str(kubeconfig), "lab"),
        ClusterSpec("edge", str(kubeconfig), "edge"),
    ]
    clusters = KubeClusters(specs)
    yield clusters
    clusters.close()


def workload(name: str, kind: str = "Deployment", cluster: str = "lab") -> Target:
    return Target(kubernetes=KubernetesObject(cluster, NAMESPACE, kind, name))


def node(name: str, cluster: str = "lab") -> Target:
    return Target(kubernetes=KubernetesObject(cluster, "", "Node", name))


def plan(
    *steps: tuple[str, list[Target], dict[str, Any]], timeout_s: float = 30.0, parallel: int = 1
) -> Plan:
    return Plan(
        plan_id="",
        request_id=uuid.uuid4().hex,
        source="test",
        rationale="",
        confidence=0.9,
        expire_at=None,
        steps=[
            Step(i, f"s{i}", action, tuple(targets), parameters, timeout_s)
            for i, (action, targets, parameters) in enumerate(steps)
        ],
        health_gates=(),
        limits=Limits(max_nodes_in_parallel=parallel),
    )


@dataclass
class Rig:
    desk: PlanDesk
    controller: PipelineController
    executor: KubernetesExecutor

    async def run(self, draft: Plan) -> Plan:
        submitted = await self.desk.submit(draft, "planner", validate_only=False)
        return await self.terminal(submitted.plan.plan_id)

    async def terminal(self, plan_id: str, timeout_s: float = 60.0) -> Plan:
        async def follow() -> Plan:
            async for current, _ in self.desk.watch(plan_id):
                if current.phase.terminal:
                    return current
            raise AssertionError("watch ended before the plan did")

        return await asyncio.wait_for(follow(), timeout_s)


def _no_telemetry(node_id: str) -> Sample[dict[str, Any]] | None:
    return None


@pytest.fixture
async def rig(database_url: str, clusters: KubeClusters) -> AsyncIterator[Rig]:
    store = Store(database_url)
    store.migrate()
    executor = KubernetesExecutor(clusters)
    executors = Executors([executor])
    desk = PlanDesk(
        store,
        PolicyEngine(),
        FleetView(fleet_size=lambda: 0, connected_nodes=lambda: 0, cordoned_nodes=frozenset),
        executors,
        limits=PlanLimitsConfig(max_steps=10, max_targets=10),
        rate_window_s=60,
        poll_interval_s=0.05,
    )
    controller = PipelineController(
        desk.repository,
        Lease(store, "pipeline-controller", "test", 10),
        executors,
        HealthGates(_no_telemetry, dict),
        interval_s=0.05,
    )
    task = asyncio.create_task(controller.run())
    try:
        yield Rig(desk, controller, executor)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
