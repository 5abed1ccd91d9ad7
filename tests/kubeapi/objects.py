"""Builders of the objects tests put or create: Deployments, StatefulSets, Services, budgets and
bare pods (DaemonSet pods, mirror pods, pods with local storage), as plain dicts."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def _containers(image: str, container: str) -> list[Obj]:
    return [{"name": container, "image": image}]


def deployment(
    name: str,
    *,
    namespace: str = "default",
    image: str = "repo/model:1",
    replicas: int = 1,
    labels: dict[str, str] | None = None,
    container: str = "main",
    max_surge: int | str | None = None,
    max_unavailable: int | str | None = None,
    progress_deadline_seconds: int | None = None,
    node_selector: dict[str, str] | None = None,
) -> Obj:
    """A Deployment whose selector is its labels (default `app: <name>`)."""
    labels = labels or {"app": name}
    spec: Obj = {
        "replicas": replicas,
        "selector": {"matchLabels": dict(labels)},
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"containers": _containers(image, container)},
        },
    }
    if max_surge is not None or max_unavailable is not None:
        rolling: Obj = {}
        if max_surge is not None:
            rolling["maxSurge"] = max_surge
        if max_unavailable is not None:
            rolling["maxUnavailable"] = max_unavailable
        spec["strategy"] = {"type": "RollingUpdate", "rollingUpdate": rolling}
    if progress_deadline_seconds is not None:
        spec["progressDeadlineSeconds"] = progress_deadline_seconds
    if node_selector:
        spec["template"]["spec"]["nodeSelector"] = dict(node_selector)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": spec,
    }


def statefulset(
    name: str,
    *,
    namespace: str = "default",
    image: str = "repo/model:1",
    replicas: int = 1,
    container: str = "main",
    service_name: str | None = None,
    parallel: bool = False,
) -> Obj:
    labels = {"app": name}
    spec: Obj = {
        "replicas": replicas,
        "selector": {"matchLabels": dict(labels)},
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"containers": _containers(image, container)},
        },
    }
    # The 1.32 schema still requires serviceName (the headless Service of the set).
    spec["serviceName"] = service_name or name
    if parallel:
        spec["podManagementPolicy"] = "Parallel"
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def service(
    name: str, *, namespace: str = "default", selector: dict[str, str] | None = None, port: int = 80
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector or {"app": name}, "ports": [{"port": port}]},
    }


def pod_disruption_budget(
    name: str,
    *,
    namespace: str = "default",
    selector: dict[str, str],
    min_available: int | str | None = None,
    max_unavailable: int | str | None = None,
) -> Obj:
    spec: Obj = {"selector": {"matchLabels": dict(selector)}}
    if min_available is not None:
        spec["minAvailable"] = min_available
    if max_unavailable is not None:
        spec["maxUnavailable"] = max_unavailable
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def pod(
    name: str,
    *,
    namespace: str = "default",
    node: str | None = None,
    image: str = "repo/agent:1",
    labels: dict[str, str] | None = None,
    owner_kind: str | None = None,
    owner_name: str | None = None,
    owner_uid: str = "00000000-0000-0000-0000-000000000001",
    mirror: bool = False,
    empty_dir: bool = False,
    running: bool = True,
) -> Obj:
    """A bare pod: owned by `owner_kind` (a DaemonSet), a static pod's mirror (`mirror`), with an
    emptyDir volume (`empty_dir`); Running and Ready on `node` unless `running` is False."""
    metadata: Obj = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if owner_kind:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner_kind,
                "name": owner_name or name,
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    if mirror:
        metadata["annotations"] = {
            "kubernetes.io/config.mirror": "0123456789abcdef",
            "kubernetes.io/config.source": "file",
        }
    spec: Obj = {"containers": [{"name": "main", "image": image}]}
    if node:
        spec["nodeName"] = node
    if empty_dir:
        spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
        spec["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    obj: Obj = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    if running and node:
        conditions = [
            {"type": kind, "status": "True"}
            for kind in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        obj["status"] = {"phase": "Running", "conditions": conditions}
    return obj
