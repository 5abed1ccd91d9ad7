"""The state of one simulated cluster as tests see it: objects put and read directly, the log of
API requests, failure injection (conflicts, RBAC refusals, errors, latency), broken images, and
the controller's clock."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from tests.kubeapi._controller import Controller
from tests.kubeapi._defaults import apply_defaults
from tests.kubeapi._errors import ApiError
from tests.kubeapi._resources import ResourceType, by_kind
from tests.kubeapi._selectors import FieldSelector, LabelSelector
from tests.kubeapi._store import Store
from tests.kubeapi._validation import check_schema

Obj = dict[str, Any]
T = TypeVar("T")
Objects = list[Obj]

DEFAULT_USER = "system:serviceaccount:sentinel:executor"
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclasses.dataclass
class RequestRecord:
    """One API request as the server received it."""

    method: str
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    path: str
    query: dict[str, str]
    field_manager: str | None
    resource: str | None  # "deployments", "deployments/scale", "pods/eviction"
    namespace: str | None
    name: str | None
    dry_run: bool
    code: int = 0  # the HTTP status answered (200 for a watch that started streaming)


@dataclasses.dataclass
class _Failure:
    verb: str
    resource: str
    namespace: str | None
    name: str | None
    error: ApiError
    remaining: int


class Cluster:
    """In-memory state of one simulated cluster, safe to use from any thread."""

    def __init__(
        self,
        *,
        event_history: int = 1000,
        clock: Callable[[], float] = time.time,
        user: str = DEFAULT_USER,
    ) -> None:
        self.store = Store(event_history, clock)
        self.user = user
        """The user named in RBAC refusals."""
        self.require_token = False
        """Answer 401 to requests without a bearer token. Off by default: kubectl sends no
        credentials over plain HTTP (the old insecure port had no authentication either)."""
        self.bookmark_seconds = 1.0
        """How often a watch that allows bookmarks receives one while idle."""
        self._broken_images: set[str] = set()
        self.controller = Controller(self.store, self._broken_images)
        self._requests: builtins.list[RequestRecord] = []
        self._conflicts: dict[tuple[str, str, str], int] = {}
        self._forbidden: set[tuple[str, str, str | None]] = set()
        self._failures: list[_Failure] = []
        self._latency = 0.0
        with self.store.lock:
            for name in DEFAULT_NAMESPACES:
                self._put_locked(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                )

    # Objects.

    def put(self, obj: Obj) -> Obj:
        """Creates or replaces an object directly (no admission, no injected failures), status
        included; the object is defaulted and checked against the schema (ValueError)."""
        with self.store.lock:
            return self._put_locked(obj)

    def _put_locked(self, obj: Obj) -> Obj:
        rt = by_kind(obj["kind"])
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", rt.api_version)
        metadata = obj.setdefault("metadata", {})
        if rt.namespaced:
            metadata.setdefault("namespace", "default")
            if self.store.get("Namespace", "", metadata["namespace"]) is None:
                self._put_locked(
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": metadata["namespace"]},
                    }
                )
        else:
            metadata.pop("namespace", None)
        apply_defaults(rt.kind, obj)
        if rt.kind == "Pod":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        existing = self.store.get(rt.kind, metadata.get("namespace", ""), metadata["name"])
        metadata.pop("resourceVersion", None)
        if existing is None:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", self.store.now())
            if rt.tracks_generation:
                metadata.setdefault("generation", 1)
        else:
            old = existing["metadata"]
            metadata["uid"] = old["uid"]
            metadata["creationTimestamp"] = old["creationTimestamp"]
            if rt.tracks_generation:
                bump = existing.get("spec") != obj.get("spec")
                metadata["generation"] = old.get("generation", 1) + (1 if bump else 0)
        self._check(rt, obj)
        if existing is None:
            return self.store.create(obj)
        return self.store.update(obj)

    @staticmethod
    def _check(rt: ResourceType, obj: Obj) -> None:
        try:
            check_schema(rt, obj)
        except ApiError as error:
            raise ValueError(error.message) from None

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of the stored object, or None. `kind` is a Kind or a plural; `namespace` is
        ignored for cluster-scoped kinds."""
        rt = by_kind(kind)
        with self.store.lock:
            return self.store.get(rt.kind, (namespace or "") if rt.namespaced else "", name)

    def require(self, kind: str, namespace: str | None, name: str) -> Obj:
        """Like `get`, for an object that must exist (KeyError otherwise)."""
        found = self.get(kind, namespace, name)
        if found is None:
            raise KeyError(f"{kind} {namespace or ''}/{name} not found")
        return found

    def list(
        self,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> Objects:
        """Copies of the stored objects of a kind, in one namespace or all, filtered."""
        rt = by_kind(kind)
        labels = LabelSelector.parse(label_selector)
        fields = FieldSelector.parse(field_selector, rt.field_labels)
        with self.store.lock:
            objects = self.store.list(rt.kind, namespace if rt.namespaced else None)
        return [
            obj
            for obj in objects
            if labels.matches(obj["metadata"].get("labels")) and fields.matches(obj)
        ]

    def update(
        self, kind: str, namespace: str | None, name: str, change: Callable[[Obj], None]
    ) -> Obj:
        """Applies `change` to a copy of the stored object and stores the result (KeyError when
        absent); generation is bumped when a workload's spec changes."""
        with self.store.lock:
            obj = self.require(kind, namespace, name)
            change(obj)
            return self._put_locked(obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Removes an object at once (no finalizers, no cascade); False when absent."""
        rt = by_kind(kind)
        with self.store.lock:
            namespace = (namespace or "") if rt.namespaced else ""
            if self.store.get(rt.kind, namespace, name) is None:
                return False
            self.store.delete(rt.kind, namespace, name)
            return True

    def add_node(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        unschedulable: bool = False,
        taints: Objects | None = None,
        allocatable: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Obj:
        """Puts a Ready node with an InternalIP, schedulable unless told otherwise."""
        with self.store.lock:
            index = len(self.store.list("Node")) + 1
        resources = {"cpu": "16", "memory": "64Gi", "pods": "110", **(allocatable or {})}
        spec: Obj = {}
        if unschedulable:
            spec["unschedulable"] = True
        if taints:
            spec["taints"] = taints
        now = self.store.now()
        node: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    **(labels or {}),
                },
            },
            "spec": spec,
            "status": {
                "capacity": dict(resources),
                "allocatable": dict(resources),
                "addresses": [
                    {"type": "InternalIP", "address": f"10.0.{index // 250}.{index % 250 + 1}"},
                    {"type": "Hostname", "address": name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "KubeletReady" if ready else "KubeletNotReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
            },
        }
        return self.put(node)

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> Obj:
        """Flips a pod's Ready condition, as a failing or recovering readiness probe would."""

        def change(pod: Obj) -> None:
            status = pod.setdefault("status", {})
            state = "True" if ready else "False"
            conditions = [
                c
                for c in status.get("conditions") or []
                if c["type"] not in ("Ready", "ContainersReady")
            ]
            for kind in ("Ready", "ContainersReady"):
                conditions.append(
                    {"type": kind, "status": state, "lastTransitionTime": self.store.now()}
                )
            status["conditions"] = conditions
            status["phase"] = "Running"
            for container in status.get("containerStatuses") or []:
                container["ready"] = ready

        return self.update("Pod", namespace, name, change)

    def mark_broken_image(self, image: str) -> None:
        """Pods started from now on with this image never become Ready (ImagePullBackOff)."""
        with self.store.lock:
            self._broken_images.add(image)

    def mark_image_fixed(self, image: str) -> None:
        """Pods backing off on this image start at the next tick."""
        with self.store.lock:
            self._broken_images.discard(image)

    @property
    def resource_version(self) -> int:
        with self.store.lock:
            return self.store.resource_version

    def compact(self) -> None:
        """Drops the change history: watches from an older resourceVersion answer 410 Gone."""
        with self.store.lock:
            self.store.compact()

    def wait_for(self, check: Callable[[], T | None], timeout: float = 10.0) -> T:
        """Blocks until `check()` returns something truthy (re-checked after every stored
        change) and returns it; TimeoutError after `timeout` seconds. Not for event loops: an
        asyncio test polls instead."""
        deadline = time.monotonic() + timeout
        with self.store.lock:
            while True:
                result = check()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s")
                self.store.changed.wait(min(remaining, 0.1))

    def tick(self) -> None:
        """Runs one step of every simulated controller."""
        with self.store.lock:
            self.controller.tick()

    # Request log.

    @property
    def requests(self) -> builtins.list[RequestRecord]:
        """The API requests received so far, oldest first (copies)."""
        with self.store.lock:
            return [dataclasses.replace(r, query=dict(r.query)) for r in self._requests]

    def clear_requests(self) -> None:
        with self.store.lock:
            self._requests.clear()

    def record(self, request: RequestRecord) -> None:
        with self.store.lock:
            self._requests.append(request)

    # Failure injection.

    def conflict_next(self, kind: str, namespace: str | None, name: str, times: int = 1) -> None:
        """The next `times` writes to this object (update, patch, delete, scale, status,
        eviction) answer 409 Conflict."""
        rt = by_kind(kind)
        with self.store.lock:
            key = (rt.kind, (namespace or "") if rt.namespaced else "", name)
            self._conflicts[key] = self._conflicts.get(key, 0) + times

    def take_conflict(self, kind: str, namespace: str, name: str) -> bool:
        with self.store.lock:
            key = (kind, namespace, name)
            if self._conflicts.get(key, 0) <= 0:
                return False
            self._conflicts[key] -= 1
            return True

    def forbid(self, verb: str, resource: str, namespace: str | None = None) -> None:
        """RBAC refuses `verb` ("*" for all) on `resource` ("deployments", "pods/eviction"),
        in one namespace or everywhere, with 403 Forbidden."""
        with self.store.lock:
            self._forbidden.add((verb, resource, namespace))

    def allow(self, verb: str, resource: str, namespace: str | None = None) -> None:
        with self.store.lock:
            self._forbidden.discard((verb, resource, namespace))

    def is_forbidden(self, verb: str, resource: str, namespace: str | None) -> bool:
        with self.store.lock:
            return any(
                v in (verb, "*") and r == resource and ns in (None, namespace)
                for v, r, ns in self._forbidden
            )

    def fail_next(
        self,
        verb: str,
        resource: str,
        *,
        code: int = 500,
        reason: str = "InternalError",
        message: str = "Internal error occurred: injected failure",
        times: int = 1,
        namespace: str | None = None,
        name: str | None = None,
        retry_after_seconds: int | None = None,
    ) -> None:
        """The next `times` requests of `verb` on `resource` answer this error Status."""
        details: Obj | None = None
        headers = {}
        if retry_after_seconds is not None:
            details = {"retryAfterSeconds": retry_after_seconds}
            headers["Retry-After"] = str(retry_after_seconds)
        error = ApiError(code, reason, message, details, headers)
        with self.store.lock:
            self._failures.append(_Failure(verb, resource, namespace, name, error, times))

    def take_failure(
        self, verb: str, resource: str, namespace: str | None, name: str | None
    ) -> ApiError | None:
        with self.store.lock:
            for failure in self._failures:
                if (
                    failure.remaining > 0
                    and failure.verb in (verb, "*")
                    and failure.resource == resource
                    and failure.namespace in (None, namespace)
                    and failure.name in (None, name)
                ):
                    failure.remaining -= 1
                    return failure.error
            return None

    def set_latency(self, seconds: float) -> None:
        """Every request waits this long before it is served."""
        with self.store.lock:
            self._latency = seconds

    @property
    def latency(self) -> float:
        with self.store.lock:
            return self._latency
