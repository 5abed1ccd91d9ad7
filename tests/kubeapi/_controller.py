"""The simulated control loops of a cluster, one deterministic step per tick: the scheduler and
kubelets (pods placed round-robin on schedulable nodes, started, or stuck pulling a broken
image), the Deployment controller (pods through ReplicaSet-like owners, rolling updates within
maxSurge/maxUnavailable, status and conditions, the progress deadline), the StatefulSet
controller (ordered pods, rolling updates from the highest ordinal), the disruption controller
(PodDisruptionBudget status) and the garbage collector (pods of deleted owners)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import re
import uuid
from typing import Any

from tests.kubeapi._selectors import LabelSelector
from tests.kubeapi._store import Store

Obj = dict[str, Any]

_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_OWNER_NAMESPACE = uuid.UUID("6f1c4a52-8d7e-4b7a-9a55-1e2f3c4d5e6f")
_ORDINAL_RE = re.compile(r"^(?P<base>.+)-(?P<ordinal>[0-9]+)$")

POD_TEMPLATE_HASH = "pod-template-hash"
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


def template_hash(template: Obj) -> str:
    """A stable hash of a pod template, spelled like the controller's (`5d9c7b8f6c`)."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    number = int.from_bytes(digest[:8], "big")
    letters = []
    for _ in range(10):
        number, index = divmod(number, len(_HASH_ALPHABET))
        letters.append(_HASH_ALPHABET[index])
    return "".join(letters)


def scaled(value: Any, total: int, *, round_up: bool) -> int:
    """An int-or-percent (`2`, `"25%"`) scaled against `total`, as the API machinery does."""
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        exact = int(value[:-1]) * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


def condition(obj: Obj, kind: str) -> Obj | None:
    for entry in (obj.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return None


def pod_ready(pod: Obj) -> bool:
    ready = condition(pod, "Ready")
    return (
        ready is not None
        and ready.get("status") == "True"
        and not pod["metadata"].get("deletionTimestamp")
    )


def controller_ref(obj: Obj) -> Obj | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _qos_class(spec: Obj) -> str:
    resources = [c.get("resources") or {} for c in spec.get("containers") or []]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        r.get("limits")
        and set(r["limits"]) >= {"cpu", "memory"}
        and all(r.get("requests", {}).get(k, v) == v for k, v in r["limits"].items())
        for r in resources
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _tolerates(spec: Obj, taint: Obj) -> bool:
    for toleration in spec.get("tolerations") or []:
        effect = toleration.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        if toleration.get("operator") == "Exists":
            if not toleration.get("key") or toleration.get("key") == taint.get("key"):
                return True
        elif toleration.get("key") == taint.get("key") and toleration.get("value", "") == taint.get(
            "value", ""
        ):
            return True
    return False


def _fits(node: Obj, spec: Obj) -> bool:
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec, taint):
            return False
    return True


def node_schedulable(node: Obj) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    ready = condition(node, "Ready")
    return ready is None or ready.get("status") == "True"


def _without_zeros(status: Obj, keep: tuple[str, ...] = ()) -> Obj:
    return {k: v for k, v in status.items() if v not in (0, None, "") or k in keep}


class Controller:
    """The control loops of one simulated cluster; `tick()` runs one step of each, with the
    store's lock held."""

    def __init__(self, store: Store, broken_images: set[str]) -> None:
        self._store = store
        self._broken_images = broken_images
        self._next_node = 0
        self._next_ip = 0
        self._pod_numbers: dict[str, int] = {}
        self._replica_sets: dict[str, str] = {}  # ReplicaSet-like owner uid -> Deployment uid
        self._statefulsets_seen: set[str] = set()
        self._progress: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._revisions: dict[str, dict[str, int]] = {}
        self._sts_templates: dict[str, dict[str, Obj]] = {}

    def deployment_of(self, owner_uid: str) -> str | None:
        """The uid of the Deployment behind a ReplicaSet-like owner uid."""
        return self._replica_sets.get(owner_uid)

    def tick(self) -> None:
        self._schedule_and_run_pods()
        self._collect_garbage()
        for deployment in self._store.list("Deployment"):
            self._reconcile_deployment(deployment)
        for statefulset in self._store.list("StatefulSet"):
            self._reconcile_statefulset(statefulset)
        for budget in self._store.list("PodDisruptionBudget"):
            self._reconcile_budget(budget)

    # Scheduler and kubelets.

    def _place(self, spec: Obj) -> str | None:
        nodes = [
            node
            for node in self._store.list("Node")
            if node_schedulable(node) and _fits(node, spec)
        ]
        if not nodes:
            return None
        node = nodes[self._next_node % len(nodes)]
        self._next_node += 1
        return str(node["metadata"]["name"])

    def _unschedulable_message(self) -> str:
        count = len(self._store.list("Node"))
        return (
            f"0/{count} nodes are available: {count} node(s) were unschedulable or did not match "
            "the pod's node selector or tolerations."
        )

    def _schedule_and_run_pods(self) -> None:
        for pod in self._store.list("Pod"):
            metadata, spec = pod["metadata"], pod.get("spec") or {}
            status = pod.setdefault("status", {})
            if metadata.get("deletionTimestamp") or status.get("phase", "Pending") != "Pending":
                continue
            if not spec.get("nodeName"):
                if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
                    continue
                node = self._place(spec)
                if node is None:
                    continue
                spec["nodeName"] = node
                status["conditions"] = [self._condition("PodScheduled", "True")]
                self._store.update(pod)
                continue
            self._run_pod(pod)

    def _condition(self, kind: str, status: str, reason: str = "", message: str = "") -> Obj:
        entry: Obj = {"type": kind, "status": status, "lastTransitionTime": self._store.now()}
        if reason:
            entry["reason"] = reason
        if message:
            entry["message"] = message
        return entry

    def _run_pod(self, pod: Obj) -> None:
        spec, status = pod["spec"], pod["status"]
        containers = spec.get("containers") or []
        broken = [c for c in containers if c.get("image") in self._broken_images]
        waiting = [
            s for s in status.get("containerStatuses") or [] if "waiting" in (s.get("state") or {})
        ]
        if broken and waiting:
            return  # still backing off
        now = self._store.now()
        status["phase"] = "Pending" if broken else "Running"
        status["hostIP"] = self._host_ip(spec["nodeName"])
        status["hostIPs"] = [{"ip": status["hostIP"]}]
        status["startTime"] = status.get("startTime") or now
        status["qosClass"] = status.get("qosClass") or _qos_class(spec)
        ready = "False" if broken else "True"
        not_ready_reason = "ContainersNotReady" if broken else ""
        not_ready_message = (
            f"containers with unready status: [{' '.join(c['name'] for c in broken)}]"
            if broken
            else ""
        )
        status["conditions"] = [
            self._condition("PodReadyToStartContainers", "True"),
            self._condition("Initialized", "True"),
            self._condition("Ready", ready, not_ready_reason, not_ready_message),
            self._condition("ContainersReady", ready, not_ready_reason, not_ready_message),
            self._condition("PodScheduled", "True"),
        ]
        if not broken:
            self._next_ip += 1
            status["podIP"] = f"10.244.{self._next_ip // 250}.{self._next_ip % 250 + 2}"
            status["podIPs"] = [{"ip": status["podIP"]}]
        statuses = []
        for container in containers:
            image = container.get("image", "")
            entry: Obj = {
                "name": container["name"],
                "image": image,
                "imageID": "",
                "ready": image not in self._broken_images,
                "restartCount": 0,
                "started": image not in self._broken_images,
            }
            if image in self._broken_images:
                entry["state"] = {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": f'Back-off pulling image "{image}"',
                    }
                }
            else:
                entry["imageID"] = f"{image.split(':')[0]}@sha256:{'0' * 64}"
                entry["containerID"] = f"containerd://{uuid.uuid4().hex}"
                entry["state"] = {"running": {"startedAt": now}}
            statuses.append(entry)
        status["containerStatuses"] = statuses
        self._store.update(pod)

    def _host_ip(self, node_name: str) -> str:
        node = self._store.get("Node", "", node_name)
        for address in ((node or {}).get("status") or {}).get("addresses") or []:
            if address.get("type") == "InternalIP":
                return str(address["address"])
        return "10.0.0.1"

    def _new_pod(
        self, namespace: str, name: str, template: Obj, labels: dict[str, str], owner: Obj
    ) -> Obj:
        template_metadata = template.get("metadata") or {}
        spec = copy.deepcopy(template.get("spec") or {})
        node = self._place(spec)
        metadata: Obj = {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": self._store.now(),
            "labels": {**(template_metadata.get("labels") or {}), **labels},
            "ownerReferences": [owner],
        }
        if template_metadata.get("annotations"):
            metadata["annotations"] = dict(template_metadata["annotations"])
        status: Obj = {"phase": "Pending", "qosClass": _qos_class(spec)}
        if node is None:
            status["conditions"] = [
                self._condition(
                    "PodScheduled", "False", "Unschedulable", self._unschedulable_message()
                )
            ]
        else:
            spec["nodeName"] = node
            status["conditions"] = [self._condition("PodScheduled", "True")]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
        pod["status"] = status
        return pod

    def _available(self, pod: Obj, min_ready_seconds: int) -> bool:
        if not pod_ready(pod):
            return False
        if min_ready_seconds <= 0:
            return True
        since = _parse_time((condition(pod, "Ready") or {}).get("lastTransitionTime"))
        return since is not None and self._store.clock() - since >= min_ready_seconds

    def _delete_pods(self, pods: list[Obj], count: int) -> list[Obj]:
        """Deletes `count` pods, the least useful first: unscheduled, pending, not ready,
        newest."""
        ranked = sorted(
            pods,
            key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]),
            reverse=True,
        )
        ranked.sort(
            key=lambda p: (
                bool(p["spec"].get("nodeName")),
                p["status"].get("phase") == "Running",
                pod_ready(p),
            )
        )
        doomed = ranked[: max(0, count)]
        for pod in doomed:
            self._store.delete("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
        return doomed

    def _collect_garbage(self) -> None:
        deployments = {d["metadata"]["uid"] for d in self._store.list("Deployment")}
        statefulsets = {s["metadata"]["uid"] for s in self._store.list("StatefulSet")}
        for pod in self._store.list("Pod"):
            owner = controller_ref(pod)
            if owner is None:
                continue
            owner_uid = owner.get("uid", "")
            orphaned = (
                owner.get("kind") == "ReplicaSet"
                and owner_uid in self._replica_sets
                and self._replica_sets[owner_uid] not in deployments
            ) or (
                owner.get("kind") == "StatefulSet"
                and owner_uid in self._statefulsets_seen
                and owner_uid not in statefulsets
            )
            if orphaned:
                self._store.delete("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])

    # Deployments.

    def _owned_by_deployment(self, deployment_uid: str, namespace: str) -> list[Obj]:
        return [
            pod
            for pod in self._store.list("Pod", namespace)
            if self._replica_sets.get((controller_ref(pod) or {}).get("uid", "")) == deployment_uid
            and not pod["metadata"].get("deletionTimestamp")
        ]

    def _create_deployment_pods(self, deployment: Obj, pod_hash: str, count: int) -> list[Obj]:
        metadata = deployment["metadata"]
        namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
        owner_name = f"{name}-{pod_hash}"
        owner_uid = str(uuid.uuid5(_OWNER_NAMESPACE, f"{uid}/{pod_hash}"))
        self._replica_sets[owner_uid] = uid
        owner = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": owner_name,
            "uid": owner_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        created = []
        for _ in range(count):
            number = self._pod_numbers.get(owner_uid, 0)
            while self._store.get("Pod", namespace, f"{owner_name}-{number}") is not None:
                number += 1
            self._pod_numbers[owner_uid] = number + 1
            pod = self._new_pod(
                namespace,
                f"{owner_name}-{number}",
                deployment["spec"]["template"],
                {POD_TEMPLATE_HASH: pod_hash},
                owner,
            )
            created.append(self._store.create(pod))
        return created

    def _reconcile_deployment(self, deployment: Obj) -> None:
        metadata, spec = deployment["metadata"], deployment["spec"]
        if metadata.get("deletionTimestamp"):
            return
        uid, namespace = metadata["uid"], metadata["namespace"]
        pod_hash = template_hash(spec["template"])
        desired = int(spec.get("replicas", 1))
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        surge = scaled(rolling.get("maxSurge", "25%"), desired, round_up=True)
        unavailable = scaled(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
        if strategy.get("type") == "Recreate":
            surge, unavailable = 0, desired
        elif surge == 0 and unavailable == 0:
            unavailable = 1
        min_ready = int(spec.get("minReadySeconds", 0) or 0)

        def split() -> tuple[list[Obj], list[Obj]]:
            owned = self._owned_by_deployment(uid, namespace)
            new = [p for p in owned if p["metadata"]["labels"].get(POD_TEMPLATE_HASH) == pod_hash]
            return new, [p for p in owned if p not in new]

        new, old = split()
        if not spec.get("paused"):
            if strategy.get("type") == "Recreate":
                if old:
                    self._delete_pods(old, len(old))
                elif len(new) < desired:
                    self._create_deployment_pods(deployment, pod_hash, desired - len(new))
                elif len(new) > desired:
                    self._delete_pods(new, len(new) - desired)
            elif not old:
                if len(new) < desired:
                    self._create_deployment_pods(deployment, pod_hash, desired - len(new))
                elif len(new) > desired:
                    self._delete_pods(new, len(new) - desired)
            else:
                total = len(new) + len(old)
                room = desired + surge - total
                if len(new) < desired and room > 0:
                    self._create_deployment_pods(
                        deployment, pod_hash, min(desired - len(new), room)
                    )
                elif len(new) > desired:
                    self._delete_pods(new, len(new) - desired)
                new, old = split()
                total = len(new) + len(old)
                new_unavailable = sum(1 for p in new if not self._available(p, min_ready))
                removable = total - (desired - unavailable) - new_unavailable
                unhealthy_old = [p for p in old if not pod_ready(p)]
                removed = self._delete_pods(unhealthy_old, min(len(unhealthy_old), removable))
                removable -= len(removed)
                healthy_old = [p for p in old if p not in removed]
                self._delete_pods(healthy_old, min(len(healthy_old), removable))
            new, old = split()
        self._write_deployment_status(deployment, pod_hash, new, old, desired, unavailable)

    def _write_deployment_status(
        self,
        deployment: Obj,
        pod_hash: str,
        new: list[Obj],
        old: list[Obj],
        desired: int,
        max_unavailable: int,
    ) -> None:
        metadata, spec = deployment["metadata"], deployment["spec"]
        uid = metadata["uid"]
        min_ready = int(spec.get("minReadySeconds", 0) or 0)
        owned = new + old
        ready = [p for p in owned if pod_ready(p)]
        available = [p for p in owned if self._available(p, min_ready)]
        new_available = [p for p in new if self._available(p, min_ready)]
        generation = metadata.get("generation", 1)
        status: Obj = _without_zeros(
            {
                "observedGeneration": generation,
                "replicas": len(owned),
                "updatedReplicas": len(new),
                "readyReplicas": len(ready),
                "availableReplicas": len(available),
                "unavailableReplicas": max(0, desired - len(available)),
            }
        )
        now, clock = self._store.now(), self._store.clock()
        signature = (generation, pod_hash, len(new), len(ready), len(available), len(owned))
        previous_signature, since = self._progress.get(uid, (None, clock))
        progressed = signature != previous_signature
        if progressed:
            since = clock
        self._progress[uid] = (signature, since)

        revisions = self._revisions.setdefault(uid, {})
        annotations = dict(metadata.get("annotations") or {})
        if pod_hash not in revisions or revisions[pod_hash] != max(revisions.values()):
            revisions[pod_hash] = max(revisions.values(), default=0) + 1
        annotations[REVISION_ANNOTATION] = str(revisions[pod_hash])

        owner_name = f"{metadata['name']}-{pod_hash}"
        complete = len(new) == desired and len(owned) == desired and len(new_available) >= desired
        previous = condition(deployment, "Progressing")
        deadline = int(spec.get("progressDeadlineSeconds", 600))
        if spec.get("paused"):
            progressing = ("Unknown", "DeploymentPaused", "Deployment is paused")
        elif complete:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{owner_name}" has successfully progressed.',
            )
        elif (
            clock - since > deadline and (previous or {}).get("reason") != "NewReplicaSetAvailable"
        ):
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{owner_name}" has timed out progressing.',
            )
        else:
            progressing = (
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{owner_name}" is progressing.',
            )
        has_minimum = len(available) >= desired - max_unavailable
        available_condition = (
            ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            if has_minimum
            else (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        )
        status["conditions"] = [
            self._deployment_condition(deployment, "Available", available_condition, now, False),
            self._deployment_condition(deployment, "Progressing", progressing, now, progressed),
        ]
        if status != deployment.get("status") or annotations != (metadata.get("annotations") or {}):
            deployment["status"] = status
            metadata["annotations"] = annotations
            self._store.update(deployment)

    @staticmethod
    def _deployment_condition(
        deployment: Obj, kind: str, value: tuple[str, str, str], now: str, progressed: bool
    ) -> Obj:
        status, reason, message = value
        previous = condition(deployment, kind) or {}
        same_status = previous.get("status") == status
        unchanged = same_status and previous.get("reason") == reason and not progressed
        return {
            "type": kind,
            "status": status,
            "lastUpdateTime": previous.get("lastUpdateTime", now) if unchanged else now,
            "lastTransitionTime": previous.get("lastTransitionTime", now) if same_status else now,
            "reason": reason,
            "message": message,
        }

    # StatefulSets.

    def _reconcile_statefulset(self, statefulset: Obj) -> None:
        metadata, spec = statefulset["metadata"], statefulset["spec"]
        if metadata.get("deletionTimestamp"):
            return
        uid, namespace, name = metadata["uid"], metadata["namespace"], metadata["name"]
        self._statefulsets_seen.add(uid)
        update_hash = template_hash(spec["template"])
        templates = self._sts_templates.setdefault(uid, {})
        templates[update_hash] = copy.deepcopy(spec["template"])
        update_revision = f"{name}-{update_hash}"
        status = statefulset.get("status") or {}
        current_revision = status.get("currentRevision") or update_revision
        desired = int(spec.get("replicas", 1))
        parallel = spec.get("podManagementPolicy") == "Parallel"
        strategy = spec.get("updateStrategy") or {}
        partition = int((strategy.get("rollingUpdate") or {}).get("partition", 0) or 0)

        def pods() -> dict[int, Obj]:
            owned = {}
            for pod in self._store.list("Pod", namespace):
                match = _ORDINAL_RE.match(pod["metadata"]["name"])
                if (controller_ref(pod) or {}).get("uid") == uid and match:
                    owned[int(match["ordinal"])] = pod
            return owned

        owned = pods()
        acted = False
        missing = [i for i in range(desired) if i not in owned]
        if missing:
            if parallel:
                for ordinal in missing:
                    self._create_statefulset_pod(statefulset, ordinal, current_revision, partition)
                acted = True
            elif all(pod_ready(p) for i, p in owned.items() if i < desired):
                self._create_statefulset_pod(statefulset, missing[0], current_revision, partition)
                acted = True
        condemned = sorted((i for i in owned if i >= desired), reverse=True)
        if condemned and not acted:
            doomed = condemned if parallel else condemned[:1]
            if parallel or all(pod_ready(p) for p in owned.values()):
                for ordinal in doomed:
                    self._store.delete("Pod", namespace, f"{name}-{ordinal}")
                acted = True
        owned = pods()
        if (
            not acted
            and strategy.get("type", "RollingUpdate") == "RollingUpdate"
            and len(owned) == desired
            and all(pod_ready(p) for p in owned.values())
        ):
            stale = [
                i
                for i, p in owned.items()
                if i >= partition
                and p["metadata"]["labels"].get("controller-revision-hash") != update_revision
            ]
            if stale:
                self._store.delete("Pod", namespace, f"{name}-{max(stale)}")
                owned = pods()

        live = list(owned.values())
        ready = [p for p in live if pod_ready(p)]

        def at(revision: str) -> int:
            return sum(
                1
                for p in live
                if p["metadata"]["labels"].get("controller-revision-hash") == revision
            )

        updated = at(update_revision)
        if updated == desired == len(live):
            current_revision = update_revision
        new_status: Obj = {
            "observedGeneration": metadata.get("generation", 1),
            "replicas": len(live),
            "readyReplicas": len(ready),
            "currentReplicas": at(current_revision),
            "updatedReplicas": updated,
            "availableReplicas": len(ready),
            "currentRevision": current_revision,
            "updateRevision": update_revision,
            "collisionCount": 0,
        }
        new_status = _without_zeros(new_status, keep=("replicas", "collisionCount"))
        if new_status != status:
            statefulset["status"] = new_status
            self._store.update(statefulset)

    def _create_statefulset_pod(
        self, statefulset: Obj, ordinal: int, current_revision: str, partition: int
    ) -> None:
        metadata, spec = statefulset["metadata"], statefulset["spec"]
        name, uid = metadata["name"], metadata["uid"]
        update_hash = template_hash(spec["template"])
        revision_hash = update_hash
        if ordinal < partition and current_revision.startswith(f"{name}-"):
            candidate = current_revision[len(name) + 1 :]
            if candidate in self._sts_templates.get(uid, {}):
                revision_hash = candidate
        template = self._sts_templates.get(uid, {}).get(revision_hash, spec["template"])
        pod_name = f"{name}-{ordinal}"
        owner = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "name": name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = {
            "controller-revision-hash": f"{name}-{revision_hash}",
            "statefulset.kubernetes.io/pod-name": pod_name,
            "apps.kubernetes.io/pod-index": str(ordinal),
        }
        pod = self._new_pod(metadata["namespace"], pod_name, template, labels, owner)
        pod["spec"]["hostname"] = pod_name
        if spec.get("serviceName"):
            pod["spec"]["subdomain"] = spec["serviceName"]
        self._store.create(pod)

    # PodDisruptionBudgets.

    def budget_status(self, budget: Obj) -> Obj:
        """The status the disruption controller would write for `budget` now."""
        spec = budget.get("spec") or {}
        namespace = budget["metadata"]["namespace"]
        selector = LabelSelector.from_object(spec.get("selector"))
        pods = [
            p
            for p in self._store.list("Pod", namespace)
            if selector.matches(p["metadata"].get("labels"))
            and not p["metadata"].get("deletionTimestamp")
        ]
        healthy = sum(1 for p in pods if pod_ready(p))
        min_available, max_unavailable = spec.get("minAvailable"), spec.get("maxUnavailable")
        if isinstance(min_available, int):
            expected = len(pods)
            desired_healthy = min_available
        elif min_available is not None or max_unavailable is not None:
            expected = self._expected_pods(pods)
            if min_available is not None:
                desired_healthy = scaled(min_available, expected, round_up=True)
            else:
                desired_healthy = max(
                    0, expected - scaled(max_unavailable, expected, round_up=True)
                )
        else:
            expected, desired_healthy = len(pods), 0
        allowed = max(0, healthy - desired_healthy)
        previous = condition(budget, "DisruptionAllowed") or {}
        state = "True" if allowed > 0 else "False"
        return {
            "observedGeneration": budget["metadata"].get("generation", 1),
            "disruptionsAllowed": allowed,
            "currentHealthy": healthy,
            "desiredHealthy": desired_healthy,
            "expectedPods": expected,
            "conditions": [
                {
                    "type": "DisruptionAllowed",
                    "status": state,
                    "reason": "SufficientPods" if allowed > 0 else "InsufficientPods",
                    "message": "",
                    "observedGeneration": budget["metadata"].get("generation", 1),
                    "lastTransitionTime": previous.get("lastTransitionTime", self._store.now())
                    if previous.get("status") == state
                    else self._store.now(),
                }
            ],
        }

    def _expected_pods(self, pods: list[Obj]) -> int:
        """The pods the owners of `pods` want: their scale, or one per pod without a known
        scalable owner."""
        deployments = {d["metadata"]["uid"]: d for d in self._store.list("Deployment")}
        statefulsets = {s["metadata"]["uid"]: s for s in self._store.list("StatefulSet")}
        owners: dict[str, int] = {}
        loose = 0
        for pod in pods:
            owner = controller_ref(pod) or {}
            owner_uid = owner.get("uid", "")
            deployment = deployments.get(self._replica_sets.get(owner_uid, ""))
            if deployment is not None:
                owners[deployment["metadata"]["uid"]] = int(deployment["spec"].get("replicas", 1))
            elif owner_uid in statefulsets:
                owners[owner_uid] = int(statefulsets[owner_uid]["spec"].get("replicas", 1))
            else:
                loose += 1
        return sum(owners.values()) + loose

    def _reconcile_budget(self, budget: Obj) -> None:
        status = self.budget_status(budget)
        if status != budget.get("status"):
            budget["status"] = status
            self._store.update(budget)
