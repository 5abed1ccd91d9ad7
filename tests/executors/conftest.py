"""Fixtures for executor tests: Kubernetes API test servers (tests/kubeapi: the real REST paths
and JSON, since no real API server can run here) with a kubeconfig naming each as a cluster, and
the plan desk and pipeline controller driving the real executors on a real store — no gRPC."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from controlplane.executors import (
    ClusterSpec,
    Executors,
    KubeClusters,
    KubernetesExecutor,
    KubernetesObject,
    Target,
)
from tests.kubeapi import KubeApiServer, write_kubeconfig
from tests.plan_rig import PlanRig, draft_plan, plan_rig

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


plan = draft_plan


@dataclass
class Rig(PlanRig):
    """The desk and controller, and the Kubernetes executor they drive."""

    executor: KubernetesExecutor


@pytest.fixture
async def rig(database_url: str, clusters: KubeClusters) -> AsyncIterator[Rig]:
    executor = KubernetesExecutor(clusters)
    async with plan_rig(database_url, Executors([executor])) as running:
        yield Rig(running.desk, running.controller, executor)
