"""The simulated controllers, stepped by hand where the sequence matters: pods of Deployments and
StatefulSets, scheduling, rolling updates, the progress deadline and garbage collection."""

from __future__ import annotations

import itertools
from typing import Any

import kubernetes_validate
import pytest

from tests.kubeapi import POD_TEMPLATE_HASH, Cluster, KubeApiServer, objects, template_hash
from tests.kubeapi_tests.conftest import MANUAL_TICKS, NAMESPACE


def _pods(cluster: Cluster, selector: str = "") -> list[dict[str, Any]]:
    return cluster.list("Pod", NAMESPACE, label_selector=selector)


def _status(cluster: Cluster, kind: str, name: str) -> dict[str, Any]:
    return cluster.require(kind, NAMESPACE, name).get("status") or {}


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


@MANUAL_TICKS
def test_deployment_pods_are_named_labelled_owned_and_spread(kube: KubeApiServer) -> None:
    cluster = kube.cluster
    cluster.update("Node", None, "gpu-1", lambda node: node["spec"].update(unschedulable=True))
    stored = cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=4))
    cluster.tick()
    pods = _pods(cluster)
    pod_hash = template_hash(stored["spec"]["template"])
    assert [p["metadata"]["name"] for p in pods] == [f"web-{pod_hash}-{n}" for n in range(4)]
    assert [p["spec"]["nodeName"] for p in pods] == ["gpu-0", "gpu-2", "gpu-0", "gpu-2"]
    for pod in pods:
        assert pod["metadata"]["labels"] == {"app": "web", POD_TEMPLATE_HASH: pod_hash}
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == (
            "ReplicaSet",
            f"web-{pod_hash}",
            True,
        )
        assert pod["spec"]["containers"][0]["image"] == "repo/model:1"
        assert pod["status"]["phase"] == "Pending"
    assert _status(cluster, "Deployment", "web")["replicas"] == 4
    assert "readyReplicas" not in _status(cluster, "Deployment", "web")

    cluster.tick()
    assert all(p["status"]["phase"] == "Running" and _ready(p) for p in _pods(cluster))
    status = _status(cluster, "Deployment", "web")
    assert (status["readyReplicas"], status["availableReplicas"], status["updatedReplicas"]) == (
        4,
        4,
        4,
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Available"]["status"] == "True"
    assert conditions["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert cluster.require("Deployment", NAMESPACE, "web")["metadata"]["annotations"] == {
        "deployment.kubernetes.io/revision": "1"
    }


@MANUAL_TICKS
def test_rolling_update_respects_surge_and_unavailability_tick_by_tick(
    kube: KubeApiServer,
) -> None:
    cluster = kube.cluster
    cluster.put(
        objects.deployment("web", namespace=NAMESPACE, replicas=4, max_surge=1, max_unavailable=0)
    )
    cluster.tick()
    cluster.tick()

    def set_image(deployment: dict[str, Any]) -> None:
        deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "repo/model:2"

    cluster.update("Deployment", NAMESPACE, "web", set_image)
    updated_by_tick = []
    for _ in range(20):
        cluster.tick()
        pods = _pods(cluster)
        assert len(pods) <= 5, "more than replicas + maxSurge pods"
        assert sum(1 for p in pods if _ready(p)) >= 4, "fewer than replicas - maxUnavailable"
        status = _status(cluster, "Deployment", "web")
        updated_by_tick.append(status.get("updatedReplicas", 0))
        progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
        if progressing["reason"] == "NewReplicaSetAvailable":
            break
    assert updated_by_tick == sorted(updated_by_tick)
    assert all(b - a <= 1 for a, b in itertools.pairwise(updated_by_tick))
    assert updated_by_tick[-1] == 4 and len(updated_by_tick) >= 6
    images = {p["spec"]["containers"][0]["image"] for p in _pods(cluster)}
    assert images == {"repo/model:2"}
    status = _status(cluster, "Deployment", "web")
    assert status["observedGeneration"] == 2 and status["replicas"] == 4
    assert cluster.require("Deployment", NAMESPACE, "web")["metadata"]["annotations"] == {
        "deployment.kubernetes.io/revision": "2"
    }


@MANUAL_TICKS
def test_recreate_strategy_removes_old_pods_before_creating_new_ones(kube: KubeApiServer) -> None:
    cluster = kube.cluster
    deployment = objects.deployment("web", namespace=NAMESPACE, replicas=2)
    deployment["spec"]["strategy"] = {"type": "Recreate"}
    cluster.put(deployment)
    cluster.tick()
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "repo/model:2"
    cluster.put(deployment)
    cluster.tick()
    assert _pods(cluster) == []
    cluster.tick()
    assert {p["spec"]["containers"][0]["image"] for p in _pods(cluster)} == {"repo/model:2"}


def test_broken_image_ends_in_progress_deadline_exceeded(kube: KubeApiServer) -> None:
    cluster = kube.cluster
    cluster.mark_broken_image("repo/model:bad")
    cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=2))
    cluster.wait_for(lambda: _status(cluster, "Deployment", "web").get("availableReplicas") == 2)

    def break_image(deployment: dict[str, Any]) -> None:
        deployment["spec"]["progressDeadlineSeconds"] = 2
        deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "repo/model:bad"

    cluster.update("Deployment", NAMESPACE, "web", break_image)

    def timed_out() -> dict[str, Any] | None:
        status = _status(cluster, "Deployment", "web")
        for entry in status.get("conditions", []):
            if entry["type"] == "Progressing" and entry["reason"] == "ProgressDeadlineExceeded":
                return status
        return None

    status = cluster.wait_for(timed_out, timeout=15)
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False"
    assert progressing["message"].endswith("has timed out progressing.")
    assert status["availableReplicas"] == 2, "old pods keep serving"
    broken = [p for p in _pods(cluster) if p["spec"]["containers"][0]["image"] == "repo/model:bad"]
    assert broken and not any(_ready(p) for p in broken)
    waiting = broken[0]["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "repo/model:bad"',
    }


def test_deleted_pod_is_recreated_on_a_schedulable_node(kube: KubeApiServer, core: Any) -> None:
    cluster = kube.cluster
    cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=1))
    pod = cluster.wait_for(lambda: [p for p in _pods(cluster) if _ready(p)])[0]
    core.patch_node(pod["spec"]["nodeName"], {"spec": {"unschedulable": True}})
    core.delete_namespaced_pod(pod["metadata"]["name"], NAMESPACE)
    replacement = cluster.wait_for(
        lambda: [p for p in _pods(cluster) if p["metadata"]["name"] != pod["metadata"]["name"]]
    )[0]
    assert replacement["spec"]["nodeName"] != pod["spec"]["nodeName"]
    assert (
        replacement["metadata"]["labels"][POD_TEMPLATE_HASH]
        == (pod["metadata"]["labels"][POD_TEMPLATE_HASH])
    )


@MANUAL_TICKS
def test_pods_wait_for_a_node_that_fits(kube: KubeApiServer) -> None:
    cluster = kube.cluster
    cluster.put(
        objects.deployment(
            "web", namespace=NAMESPACE, node_selector={"sentinel.dev/pool": "inference"}
        )
    )
    cluster.tick()
    cluster.tick()
    (pod,) = _pods(cluster)
    assert "nodeName" not in pod["spec"]
    scheduled = pod["status"]["conditions"][0]
    assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    cluster.add_node("infer-0", labels={"sentinel.dev/pool": "inference"})
    cluster.tick()
    cluster.tick()
    (pod,) = _pods(cluster)
    assert pod["spec"]["nodeName"] == "infer-0" and _ready(pod)


@MANUAL_TICKS
def test_statefulset_creates_in_order_and_updates_from_the_highest_ordinal(
    kube: KubeApiServer,
) -> None:
    cluster = kube.cluster
    cluster.put(objects.statefulset("db", namespace=NAMESPACE, replicas=3))
    names_by_tick = []
    for _ in range(6):
        cluster.tick()
        names_by_tick.append([p["metadata"]["name"] for p in _pods(cluster)])
    assert names_by_tick[:3] == [["db-0"], ["db-0", "db-1"], ["db-0", "db-1", "db-2"]]
    status = _status(cluster, "StatefulSet", "db")
    assert (status["replicas"], status["readyReplicas"], status["currentReplicas"]) == (3, 3, 3)
    assert status["currentRevision"] == status["updateRevision"]
    first_revision = status["currentRevision"]

    def set_image(statefulset: dict[str, Any]) -> None:
        statefulset["spec"]["template"]["spec"]["containers"][0]["image"] = "repo/model:2"

    cluster.update("StatefulSet", NAMESPACE, "db", set_image)
    replaced = []
    for _ in range(15):
        before = {p["metadata"]["name"] for p in _pods(cluster)}
        cluster.tick()
        replaced += sorted(before - {p["metadata"]["name"] for p in _pods(cluster)})
        status = _status(cluster, "StatefulSet", "db")
        if status.get("updatedReplicas") == 3 and status.get("readyReplicas") == 3:
            break
    assert replaced == ["db-2", "db-1", "db-0"]
    assert status["currentRevision"] == status["updateRevision"] != first_revision
    assert status["observedGeneration"] == 2 and status["currentReplicas"] == 3
    assert {p["spec"]["containers"][0]["image"] for p in _pods(cluster)} == {"repo/model:2"}
    assert {p["spec"]["hostname"] for p in _pods(cluster)} == {"db-0", "db-1", "db-2"}


@MANUAL_TICKS
def test_deleting_a_deployment_collects_its_pods_but_not_daemonset_or_mirror_pods(
    kube: KubeApiServer, apps: Any
) -> None:
    cluster = kube.cluster
    cluster.put(objects.pod("agent-x", namespace=NAMESPACE, node="gpu-0", owner_kind="DaemonSet"))
    cluster.put(objects.pod("static-x", namespace=NAMESPACE, node="gpu-0", mirror=True))
    cluster.put(objects.pod("scratch", namespace=NAMESPACE, node="gpu-1", empty_dir=True))
    cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=2))
    cluster.tick()
    assert len(_pods(cluster, "app=web")) == 2
    apps.delete_namespaced_deployment("web", NAMESPACE)
    cluster.tick()
    assert sorted(p["metadata"]["name"] for p in _pods(cluster)) == [
        "agent-x",
        "scratch",
        "static-x",
    ]
    mirror = cluster.require("Pod", NAMESPACE, "static-x")
    assert "kubernetes.io/config.mirror" in mirror["metadata"]["annotations"]


@MANUAL_TICKS
def test_orphan_propagation_keeps_the_pods(kube: KubeApiServer, apps: Any) -> None:
    cluster = kube.cluster
    cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=2))
    cluster.tick()
    apps.delete_namespaced_deployment("web", NAMESPACE, propagation_policy="Orphan")
    cluster.tick()
    pods = _pods(cluster, "app=web")
    assert len(pods) == 2
    assert all(not p["metadata"].get("ownerReferences") for p in pods)


def test_every_object_the_controller_writes_passes_the_schema(kube: KubeApiServer) -> None:
    cluster = kube.cluster
    cluster.mark_broken_image("repo/model:bad")
    cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=2))
    cluster.put(objects.deployment("bad", namespace=NAMESPACE, image="repo/model:bad"))
    cluster.put(objects.statefulset("db", namespace=NAMESPACE, replicas=2))
    cluster.put(objects.pod_disruption_budget("web", namespace=NAMESPACE, selector={"app": "web"}))
    cluster.wait_for(lambda: _status(cluster, "StatefulSet", "db").get("readyReplicas") == 2)
    cluster.wait_for(lambda: _status(cluster, "PodDisruptionBudget", "web").get("currentHealthy"))
    for kind in ("Deployment", "StatefulSet", "Pod", "Node", "PodDisruptionBudget", "Namespace"):
        for obj in cluster.list(kind):
            kubernetes_validate.validate(obj, "1.32", strict=True)


@pytest.mark.parametrize("kube", ["manual"], indirect=True)
def test_cluster_put_refuses_objects_that_fail_the_schema(kube: KubeApiServer) -> None:
    body = objects.deployment("web", namespace=NAMESPACE)
    body["spec"]["replica"] = 2
    with pytest.raises(ValueError, match="'replica' was unexpected"):
        kube.cluster.put(body)
