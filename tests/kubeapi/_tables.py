"""Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks for, with the columns
kubectl shows for each kind."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from tests.kubeapi._controller import condition
from tests.kubeapi._resources import ResourceType
from tests.kubeapi._selectors import LabelSelector

Obj = dict[str, Any]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _age(obj: Obj, now: float) -> str:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return "<unknown>"
    moment = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    seconds = max(0, int(now - moment.timestamp()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _containers(obj: Obj) -> list[Obj]:
    template = (obj.get("spec") or {}).get("template") or {}
    return list((template.get("spec") or {}).get("containers") or [])


def _deployment(obj: Obj) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
    ]


def _workload_wide(obj: Obj) -> list[Any]:
    containers = _containers(obj)
    return [
        ",".join(c.get("name", "") for c in containers),
        ",".join(c.get("image", "") for c in containers),
        str(LabelSelector.from_object((obj.get("spec") or {}).get("selector"))),
    ]


def _statefulset(obj: Obj) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}"]


def _pod(obj: Obj) -> list[Any]:
    status = obj.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    total = len((obj.get("spec") or {}).get("containers") or [])
    reason = status.get("phase", "Pending")
    for entry in statuses:
        waiting = (entry.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
    if obj["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    return [f"{ready}/{total}", reason, restarts]


def _pod_wide(obj: Obj) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [status.get("podIP", "<none>"), spec.get("nodeName", "<none>"), "<none>", "<none>"]


def _node(obj: Obj) -> list[Any]:
    ready = condition(obj, "Ready")
    state = "Ready" if ready and ready.get("status") == "True" else "NotReady"
    if (obj.get("spec") or {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    roles = sorted(
        key.split("/", 1)[1]
        for key in obj["metadata"].get("labels") or {}
        if key.startswith("node-role.kubernetes.io/")
    )
    return [state, ",".join(roles) or "<none>"]


def _node_version(obj: Obj) -> list[Any]:
    version = ((obj.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "")
    return [version or "<unknown>"]


def _service(obj: Obj) -> list[Any]:
    spec = obj.get("spec") or {}
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    return [
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP", "<none>"),
        "<none>",
        ports or "<none>",
    ]


def _budget(obj: Obj) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        str(spec.get("minAvailable", "N/A")),
        str(spec.get("maxUnavailable", "N/A")),
        status.get("disruptionsAllowed", 0),
    ]


def _namespace(obj: Obj) -> list[Any]:
    return [(obj.get("status") or {}).get("phase", "Active")]


_Columns = list[tuple[str, str, int]]
_COLUMNS: dict[
    str, tuple[_Columns, Callable[[Obj], list[Any]], _Columns, Callable[[Obj], list[Any]] | None]
] = {
    "Deployment": (
        [("Ready", "string", 0), ("Up-to-date", "integer", 0), ("Available", "integer", 0)],
        _deployment,
        [("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)],
        _workload_wide,
    ),
    "StatefulSet": (
        [("Ready", "string", 0)],
        _statefulset,
        [("Containers", "string", 1), ("Images", "string", 1)],
        lambda obj: _workload_wide(obj)[:2],
    ),
    "Pod": (
        [("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0)],
        _pod,
        [
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        _pod_wide,
    ),
    "Node": (
        [("Status", "string", 0), ("Roles", "string", 0)],
        _node,
        [("Version", "string", 0)],
        _node_version,
    ),
    "Service": (
        [
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
        ],
        _service,
        [],
        None,
    ),
    "PodDisruptionBudget": (
        [
            ("Min Available", "string", 0),
            ("Max Unavailable", "string", 0),
            ("Allowed Disruptions", "integer", 0),
        ],
        _budget,
        [],
        None,
    ),
    "Namespace": ([("Status", "string", 0)], _namespace, [], None),
}


def table(
    rt: ResourceType, objects: list[Obj], resource_version: int, include: str, now: float
) -> Obj:
    """A Table of `objects`; `include` is the includeObject parameter (None, Metadata, Object)."""
    columns, cells, wide_columns, wide_cells = _COLUMNS.get(rt.kind, ([], lambda _: [], [], None))
    definitions = [("Name", "string", 0), *columns, ("Age", "string", 0), *wide_columns]
    rows = []
    for obj in objects:
        row_cells = [obj["metadata"]["name"], *cells(obj), _age(obj, now)]
        if wide_cells is not None:
            row_cells += wide_cells(obj)
        row: Obj = {"cells": row_cells}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(resource_version)},
        "columnDefinitions": [
            {
                "name": name,
                "type": kind,
                "format": "name" if name == "Name" else "",
                "description": f"{name} of the {rt.kind}",
                "priority": priority,
            }
            for name, kind, priority in definitions
        ],
        "rows": rows,
    }
