"""Watches through `kubernetes.watch.Watch`: a rollout seen to completion, resuming from a
resourceVersion, 410 Gone after compaction, selector transitions and bookmarks."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubernetes import client

from tests.kubeapi import Cluster, KubeApiServer, objects
from tests.kubeapi_tests.conftest import NAMESPACE, new_watch


def test_watch_sees_a_rollout_progress_to_completion(apps: Any, kube: KubeApiServer) -> None:
    kube.cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=4))
    kube.cluster.wait_for(
        lambda: (
            (kube.cluster.require("Deployment", NAMESPACE, "web").get("status") or {}).get(
                "availableReplicas"
            )
            == 4
        )
    )
    listed = apps.list_namespaced_deployment(NAMESPACE)
    apps.patch_namespaced_deployment(
        "web",
        NAMESPACE,
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "main", "image": "repo/model:2"}]}}
            }
        },
    )
    updated_seen: list[int] = []
    reasons: list[str] = []
    stream = new_watch()
    for event in stream.stream(
        apps.list_namespaced_deployment,
        NAMESPACE,
        field_selector="metadata.name=web",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=20,
    ):
        deployment = event["object"]
        status = deployment.status
        if status.observed_generation != 2:
            continue  # the patch itself, before the controller saw it
        updated_seen.append(status.updated_replicas or 0)
        progressing = next(c for c in status.conditions if c.type == "Progressing")
        reasons.append(progressing.reason)
        if progressing.reason == "NewReplicaSetAvailable":
            stream.stop()
    assert reasons[-1] == "NewReplicaSetAvailable"
    assert "ReplicaSetUpdated" in reasons
    assert updated_seen[-1] == 4
    assert len(set(updated_seen)) >= 3, f"updatedReplicas jumped: {updated_seen}"
    assert updated_seen == sorted(updated_seen), "updatedReplicas never goes back"
    final = apps.read_namespaced_deployment("web", NAMESPACE).status
    assert (final.replicas, final.ready_replicas, final.available_replicas) == (4, 4, 4)
    assert final.unavailable_replicas is None


def test_watch_without_resource_version_starts_with_the_current_objects(
    core: Any, kube: KubeApiServer
) -> None:
    events = list(
        new_watch().stream(core.list_node, timeout_seconds=1, label_selector="sentinel.dev/pool")
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "gpu-0"),
        ("ADDED", "gpu-1"),
        ("ADDED", "gpu-2"),
    ]


def test_watch_from_a_resource_version_replays_only_later_changes(
    core: Any, kube: KubeApiServer
) -> None:
    start = core.list_node().metadata.resource_version
    kube.cluster.add_node("gpu-3")
    core.patch_node("gpu-0", {"spec": {"unschedulable": True}})
    core.delete_node("gpu-3")
    events = list(new_watch().stream(core.list_node, resource_version=start, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "gpu-3"),
        ("MODIFIED", "gpu-0"),
        ("DELETED", "gpu-3"),
    ]
    assert int(events[-1]["object"].metadata.resource_version) > int(start)


def test_watch_from_a_compacted_resource_version_answers_410_gone(
    core: Any, kube: KubeApiServer
) -> None:
    start = core.list_node().metadata.resource_version
    kube.cluster.add_node("gpu-3")
    kube.cluster.compact()
    with pytest.raises(client.ApiException) as caught:
        list(new_watch().stream(core.list_node, resource_version=start, timeout_seconds=2))
    assert caught.value.status == 410
    assert "too old resource version" in caught.value.reason


def test_event_history_is_bounded() -> None:
    bounded = Cluster(event_history=3)
    first = bounded.resource_version
    for index in range(5):
        bounded.add_node(f"n-{index}")
    assert bounded.store.changes_after(first) is None
    assert len(bounded.store.changes_after(bounded.resource_version - 3) or []) == 3


def test_objects_leaving_a_selector_are_reported_deleted(core: Any, kube: KubeApiServer) -> None:
    start = core.list_node().metadata.resource_version
    core.patch_node("gpu-1", {"metadata": {"labels": {"sentinel.dev/pool": None}}})
    core.patch_node("gpu-1", {"metadata": {"labels": {"sentinel.dev/pool": "gpu"}}})
    events = list(
        new_watch().stream(
            core.list_node,
            resource_version=start,
            label_selector="sentinel.dev/pool=gpu",
            timeout_seconds=1,
        )
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("DELETED", "gpu-1"),
        ("ADDED", "gpu-1"),
    ]


def test_idle_watch_receives_bookmarks(core: Any, kube: KubeApiServer) -> None:
    kube.cluster.bookmark_seconds = 0.2
    start = core.list_node().metadata.resource_version
    events = list(
        new_watch().stream(
            core.list_node,
            resource_version=start,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    )
    assert events and {e["type"] for e in events} == {"BOOKMARK"}
    assert events[0]["raw_object"]["metadata"]["resourceVersion"] == start


def test_stopping_the_server_ends_open_watches(core: Any, kube: KubeApiServer) -> None:
    received: list[str] = []

    def follow() -> None:
        try:
            for event in new_watch().stream(core.list_node, timeout_seconds=30):
                received.append(event["type"])
        except Exception as error:  # the stream is cut: any transport error will do
            received.append(type(error).__name__)

    follower = threading.Thread(target=follow)
    follower.start()
    kube.cluster.wait_for(lambda: any(r.verb == "watch" for r in kube.cluster.requests))
    kube.stop()
    follower.join(timeout=10)
    assert not follower.is_alive()
    assert received[:3] == ["ADDED"] * 3
