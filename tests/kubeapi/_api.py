"""The API server's request handling, independent of HTTP: routing of REST paths, discovery,
authentication, RBAC and injected failures, and the verbs (get, list, watch, create, update,
patch, delete, deletecollection) with the subresources status, scale and eviction."""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from tests.kubeapi import _errors as errors
from tests.kubeapi._cluster import Cluster, RequestRecord
from tests.kubeapi._controller import controller_ref, pod_ready
from tests.kubeapi._defaults import apply_defaults
from tests.kubeapi._errors import ApiError, Cause
from tests.kubeapi._patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from tests.kubeapi._resources import (
    GROUPS,
    NAMESPACES,
    PODS,
    SERVER_VERSION,
    ResourceType,
    Target,
    api_group,
    api_group_list,
    api_versions,
    by_path,
    resource_list,
)
from tests.kubeapi._selectors import FieldSelector, LabelSelector
from tests.kubeapi._tables import table, wants_table
from tests.kubeapi._validation import check_create, check_schema, check_update
from tests.kubeapi._watch import DEFAULT_TIMEOUT, Watch

Obj = dict[str, Any]

logger = logging.getLogger(__name__)

_PATCHES: dict[str, Callable[[Any, Any], Any]] = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge_patch,
    "application/json-patch+json": json_patch,
}
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclasses.dataclass
class ApiRequest:
    """An HTTP request as the API layer sees it (header names in lower case)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclasses.dataclass
class Reply:
    """A complete JSON answer."""

    code: int
    body: Obj
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


class KubeApi:
    """Serves API requests against one cluster."""

    def __init__(self, cluster: Cluster, server_address: Callable[[], str]) -> None:
        self._cluster = cluster
        self._store = cluster.store
        self._server_address = server_address

    # Entry point.

    def handle(self, request: ApiRequest) -> Reply | Watch:
        latency = self._cluster.latency
        if latency > 0:
            time.sleep(latency)
        path = "/" + request.path.strip("/")
        record = RequestRecord(
            method=request.method,
            verb=request.method.lower(),
            path=path,
            query=dict(request.query),
            field_manager=request.query.get("fieldManager"),
            resource=None,
            namespace=None,
            name=None,
            dry_run=bool(request.query.get("dryRun")),
        )
        reply: Reply | Watch
        try:
            reply = self._handle(request, path, record)
        except ApiError as error:
            reply = Reply(error.code, error.status(), dict(error.headers))
        except Exception as error:  # a bug here must reach the test as an answer, not a hang
            logger.exception("test API server failed on %s %s", request.method, path)
            failure = ApiError(500, "InternalError", f"Internal error occurred: {error!r}")
            reply = Reply(500, failure.status())
        record.code = reply.code if isinstance(reply, Reply) else 200
        self._cluster.record(record)
        return reply

    def _handle(self, request: ApiRequest, path: str, record: RequestRecord) -> Reply | Watch:
        authorization = request.headers.get("authorization", "")
        if self._cluster.require_token and not authorization.startswith("Bearer "):
            raise errors.unauthorized()
        discovery = self._discovery(path)
        if discovery is not None:
            if request.method != "GET":
                raise errors.method_not_allowed()
            record.verb = "get"
            return Reply(200, discovery)
        target = self._route(path)
        if target is None:
            raise errors.path_not_found()
        verb = self._verb(request, target)
        resource = target.rt.plural + (f"/{target.subresource}" if target.subresource else "")
        record.verb, record.resource = verb, resource
        record.namespace, record.name = target.namespace, target.name
        if self._cluster.is_forbidden(verb, resource, target.namespace):
            raise errors.forbidden(
                target.rt, verb, resource, self._cluster.user, target.namespace, target.name
            )
        failure = self._cluster.take_failure(verb, resource, target.namespace, target.name)
        if failure is not None:
            raise failure
        return self._serve(verb, target, request)

    # Routing.

    def _discovery(self, path: str) -> Obj | None:
        parts = [p for p in path.split("/") if p]
        document: Obj | None = None
        if path == "/version":
            return dict(SERVER_VERSION)
        if path == "/api":
            return api_versions(self._server_address())
        if path == "/apis":
            return api_group_list()
        if parts[:1] == ["api"] and len(parts) == 2:
            document = resource_list("", parts[1])
        elif parts[:1] == ["apis"] and len(parts) == 2:
            document = api_group(parts[1]) if parts[1] in GROUPS else None
        elif parts[:1] == ["apis"] and len(parts) == 3:
            document = resource_list(parts[1], parts[2])
        else:
            return None
        if document is None:
            raise errors.path_not_found()
        return document

    def _route(self, path: str) -> Target | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if len(rest) >= 3 and rest[0] == "namespaces":
            rt = by_path(group, version, rest[2])
            if rt is not None and rt.namespaced and len(rest) <= 5:
                return Target(rt, rest[1], _at(rest, 3), _at(rest, 4))
        if not rest:
            return None
        rt = by_path(group, version, rest[0])
        if rt is None or len(rest) > 3:
            return None
        if rt.namespaced:
            if len(rest) > 1:
                return None
            return Target(rt, None, None, None)
        return Target(rt, None, _at(rest, 1), _at(rest, 2))

    @staticmethod
    def _verb(request: ApiRequest, target: Target) -> str:
        watching = request.query.get("watch") in ("true", "1")
        method = request.method
        if target.subresource is not None:
            sub = target.rt.subresource(target.subresource)
            if sub is None or target.name is None:
                raise errors.path_not_found()
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "POST": "create"}.get(method)
            if verb is None or verb not in sub.verbs:
                raise errors.method_not_allowed()
            return verb
        if method == "GET":
            verb = "watch" if watching else ("get" if target.name else "list")
        elif method == "POST" and target.name is None:
            verb = "create"
        elif method in ("PUT", "PATCH") and target.name is not None:
            verb = "update" if method == "PUT" else "patch"
        elif method == "DELETE":
            verb = "delete" if target.name else "deletecollection"
        else:
            raise errors.method_not_allowed()
        all_namespaces = target.rt.namespaced and target.namespace is None
        if verb not in target.rt.verbs or (all_namespaces and verb not in ("list", "watch")):
            raise errors.method_not_allowed()
        return verb

    def _serve(self, verb: str, target: Target, request: ApiRequest) -> Reply | Watch:
        sub = target.subresource
        if sub == "scale":
            return {"get": self._get_scale, "update": self._update_scale, "patch": self._patch}[
                verb
            ](target, request)
        if sub == "eviction":
            return self._evict(target, request)
        handlers: dict[str, Callable[[Target, ApiRequest], Reply | Watch]] = {
            "get": self._get,
            "list": self._list,
            "watch": self._watch,
            "create": self._create,
            "update": self._update,
            "patch": self._patch,
            "delete": self._delete,
            "deletecollection": self._delete_collection,
        }
        return handlers[verb](target, request)

    # Reads.

    def _get(self, target: Target, request: ApiRequest) -> Reply:
        assert target.name is not None
        with self._store.lock:
            obj = self._existing(target)
            resource_version = self._store.resource_version
        if wants_table(request.headers.get("accept", "")):
            include = request.query.get("includeObject", "Metadata")
            return Reply(
                200, table(target.rt, [obj], resource_version, include, self._store.clock())
            )
        return Reply(200, obj)

    def _existing(self, target: Target) -> Obj:
        assert target.name is not None
        obj = self._store.get(target.rt.kind, target.namespace or "", target.name)
        if obj is None:
            raise errors.not_found(target.rt, target.name)
        return obj

    def _selectors(
        self, target: Target, request: ApiRequest
    ) -> tuple[LabelSelector, FieldSelector]:
        try:
            labels = LabelSelector.parse(request.query.get("labelSelector", ""))
            fields = FieldSelector.parse(
                request.query.get("fieldSelector", ""), target.rt.field_labels
            )
        except ValueError as error:
            raise errors.bad_request(str(error)) from None
        if target.name is not None:
            fields.terms.append(("metadata.name", True, target.name))
        return labels, fields

    def _list(self, target: Target, request: ApiRequest) -> Reply:
        labels, fields = self._selectors(target, request)
        with self._store.lock:
            objects = self._store.list(target.rt.kind, target.namespace)
            resource_version = self._store.resource_version
        items = [
            obj
            for obj in objects
            if labels.matches(obj["metadata"].get("labels")) and fields.matches(obj)
        ]
        metadata: Obj = {"resourceVersion": str(resource_version)}
        items, metadata = self._page(items, metadata, request)
        if wants_table(request.headers.get("accept", "")):
            include = request.query.get("includeObject", "Metadata")
            body = table(target.rt, items, resource_version, include, self._store.clock())
            body["metadata"] = metadata
            return Reply(200, body)
        for item in items:
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return Reply(
            200,
            {
                "kind": f"{target.rt.kind}List",
                "apiVersion": target.rt.api_version,
                "metadata": metadata,
                "items": items,
            },
        )

    @staticmethod
    def _page(items: list[Obj], metadata: Obj, request: ApiRequest) -> tuple[list[Obj], Obj]:
        def key(obj: Obj) -> str:
            return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"

        token = request.query.get("continue")
        if token:
            try:
                after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise errors.bad_request(f"invalid continue token: {token}") from None
            items = [item for item in items if key(item) > after]
        limit = request.query.get("limit", "")
        if limit.isdigit() and 0 < int(limit) < len(items):
            metadata["remainingItemCount"] = len(items) - int(limit)
            items = items[: int(limit)]
            metadata["continue"] = base64.urlsafe_b64encode(
                json.dumps({"after": key(items[-1])}).encode()
            ).decode()
        return items, metadata

    def _watch(self, target: Target, request: ApiRequest) -> Watch:
        labels, fields = self._selectors(target, request)
        query = request.query
        text = query.get("resourceVersion", "")
        start: int | None = None
        if text not in ("", "0"):
            if not text.isdigit():
                raise errors.bad_request(f'invalid resource version "{text}"')
            start = int(text)
        initial_events = query.get("sendInitialEvents") == "true"
        if initial_events:
            start = None
        timeout = DEFAULT_TIMEOUT
        if query.get("timeoutSeconds", "").isdigit():
            timeout = float(query["timeoutSeconds"])
        return Watch(
            self._cluster,
            target,
            labels,
            fields,
            start,
            timeout,
            query.get("allowWatchBookmarks") in ("true", "1"),
            initial_events,
        )

    # Writes.

    def _dry_run(self, request: ApiRequest) -> bool:
        value = request.query.get("dryRun", "")
        if value and value != "All":
            raise errors.bad_request(
                f'dryRun: Unsupported value: "{value}": supported values: "All"'
            )
        return value == "All"

    def _decode(self, request: ApiRequest, kind: str, api_version: str) -> Obj:
        content_type = request.headers.get("content-type", "application/json").split(";")[0]
        if request.method in ("POST", "PUT") and content_type.strip() != "application/json":
            raise errors.unsupported_media_type(content_type)
        return self._decode_as(request.body, kind, api_version)

    @staticmethod
    def _decode_as(body: bytes, kind: str, api_version: str) -> Obj:
        try:
            obj = json.loads(body or b"null")
        except ValueError as error:
            raise errors.bad_request(
                f"couldn't get version/kind; json parse error: {error}"
            ) from None
        if not isinstance(obj, dict):
            raise errors.bad_request("Object 'Kind' is missing in the request body")
        if obj.get("kind", kind) != kind or obj.get("apiVersion", api_version) != api_version:
            raise errors.bad_request(
                f"the object provided is unrecognized (must be of type {kind} in "
                f"{api_version}): {obj.get('apiVersion')}, Kind={obj.get('kind')}"
            )
        obj["kind"], obj["apiVersion"] = kind, api_version
        if not isinstance(obj.setdefault("metadata", {}), dict):
            raise errors.bad_request("metadata must be an object")
        return obj

    def _create(self, target: Target, request: ApiRequest) -> Reply:
        rt = target.rt
        obj = self._decode(request, rt.kind, rt.api_version)
        dry_run = self._dry_run(request)
        metadata = obj["metadata"]
        if rt.namespaced:
            if metadata.get("namespace") not in (None, "", target.namespace):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            metadata["namespace"] = target.namespace
        else:
            metadata.pop("namespace", None)
        if metadata.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        with self._store.lock:
            if rt.namespaced and self._store.get("Namespace", "", target.namespace or "") is None:
                raise errors.not_found(NAMESPACES, target.namespace or "")
            if not metadata.get("name"):
                if not metadata.get("generateName"):
                    raise errors.invalid(
                        rt,
                        "",
                        [Cause.required("metadata.name", "name or generateName is required")],
                    )
                metadata["name"] = self._generate_name(rt, target, metadata["generateName"])
            self._prepare_create(rt, obj)
            check_schema(rt, obj)
            check_create(rt, obj)
            if self._store.get(rt.kind, target.namespace or "", metadata["name"]) is not None:
                raise errors.already_exists(rt, metadata["name"])
            if dry_run:
                return Reply(201, obj)
            return Reply(201, self._store.create(obj))

    def _generate_name(self, rt: ResourceType, target: Target, prefix: str) -> str:
        for _ in range(100):
            suffix = "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
            name = f"{prefix}{suffix}"
            if self._store.get(rt.kind, target.namespace or "", name) is None:
                return name
        raise errors.already_exists(rt, prefix)

    def _prepare_create(self, rt: ResourceType, obj: Obj) -> None:
        metadata = obj["metadata"]
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = self._store.now()
        for field in (
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ):
            metadata.pop(field, None)
        if rt.tracks_generation:
            metadata["generation"] = 1
        else:
            metadata.pop("generation", None)
        apply_defaults(rt.kind, obj)
        spec = obj.get("spec") or {}
        if rt.kind == "Deployment":
            obj["status"] = {}
        elif rt.kind == "StatefulSet":
            obj["status"] = {"replicas": 0, "availableReplicas": 0}
        elif rt.kind == "PodDisruptionBudget":
            obj["status"] = {
                "disruptionsAllowed": 0,
                "currentHealthy": 0,
                "desiredHealthy": 0,
                "expectedPods": 0,
            }
        elif rt.kind == "Pod":
            obj["status"] = {"phase": "Pending"}
        elif rt.kind == "Service":
            obj["status"] = {"loadBalancer": {}}
            if spec.get("type") != "ExternalName" and not spec.get("clusterIP"):
                spec["clusterIP"] = self._allocate_cluster_ip()
            if spec.get("clusterIP") and spec["clusterIP"] != "None":
                spec["clusterIPs"] = [spec["clusterIP"]]
        elif rt.kind == "Namespace":
            obj["status"] = {"phase": "Active"}

    def _allocate_cluster_ip(self) -> str:
        taken = {(s.get("spec") or {}).get("clusterIP") for s in self._store.list("Service")}
        for index in range(10, 65000):
            address = f"10.96.{index // 250}.{index % 250 + 1}"
            if address not in taken:
                return address
        raise ApiError(500, "InternalError", "no cluster IPs left")

    def _update(self, target: Target, request: ApiRequest) -> Reply:
        rt = target.rt
        assert target.name is not None
        obj = self._decode(request, rt.kind, rt.api_version)
        dry_run = self._dry_run(request)
        self._check_identity(target, obj)
        with self._store.lock:
            old = self._existing(target)
            self._check_write(target, old, obj)
            new = self._prepare_update(rt, old, obj, target.subresource)
            return Reply(200, self._commit(target, old, new, dry_run))

    def _check_identity(self, target: Target, obj: Obj) -> None:
        metadata = obj["metadata"]
        if metadata.get("name") != target.name:
            raise errors.bad_request(
                f"the name of the object ({metadata.get('name', '')}) does not match the name on "
                f"the URL ({target.name})"
            )
        if target.rt.namespaced:
            if metadata.get("namespace") not in (None, "", target.namespace):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            metadata["namespace"] = target.namespace
        else:
            metadata.pop("namespace", None)

    def _check_write(self, target: Target, old: Obj, incoming: Obj | None) -> None:
        """Injected conflicts, then the resourceVersion precondition."""
        rt, name = target.rt, old["metadata"]["name"]
        if self._cluster.take_conflict(rt.kind, old["metadata"].get("namespace", ""), name):
            raise errors.conflict(rt, name)
        if incoming is None:
            return
        wanted = (incoming.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rt, name)

    def _prepare_update(self, rt: ResourceType, old: Obj, incoming: Obj, sub: str | None) -> Obj:
        if sub == "status":
            new = copy.deepcopy(old)
            if "status" in incoming:
                new["status"] = incoming["status"]
            else:
                new.pop("status", None)
            return new
        new = copy.deepcopy(incoming)
        metadata, old_metadata = new.setdefault("metadata", {}), old["metadata"]
        for field in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if field in old_metadata:
                metadata[field] = old_metadata[field]
            else:
                metadata.pop(field, None)
        metadata["resourceVersion"] = old_metadata["resourceVersion"]
        metadata.pop("generation", None)
        if rt.has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        if rt.kind == "Service":
            old_spec, spec = old.get("spec") or {}, new.setdefault("spec", {})
            for field in ("clusterIP", "clusterIPs"):
                if field not in spec and field in old_spec:
                    spec[field] = copy.deepcopy(old_spec[field])
        apply_defaults(rt.kind, new)
        if "generation" in old_metadata:
            changed = rt.tracks_generation and new.get("spec") != old.get("spec")
            metadata["generation"] = old_metadata["generation"] + (1 if changed else 0)
        return new

    def _commit(self, target: Target, old: Obj, new: Obj, dry_run: bool) -> Obj:
        rt = target.rt
        check_schema(rt, new)
        if target.subresource is None:
            check_update(rt, old, new)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old
        if dry_run:
            return new
        metadata = new["metadata"]
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            return self._store.delete(
                rt.kind, metadata.get("namespace", ""), metadata["name"], final=new
            )
        return self._store.update(new)

    def _patch(self, target: Target, request: ApiRequest) -> Reply:
        rt = target.rt
        assert target.name is not None
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        apply = _PATCHES.get(content_type)
        if apply is None:
            if content_type.startswith("application/apply-patch"):
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "server-side apply (application/apply-patch+yaml) is not supported by this "
                    "test API server",
                )
            raise errors.unsupported_media_type(content_type)
        try:
            patch = json.loads(request.body or b"null")
        except ValueError as error:
            raise errors.bad_request(f"error decoding patch: {error}") from None
        if patch is None or (
            content_type != "application/json-patch+json" and not isinstance(patch, dict)
        ):
            raise errors.bad_request("the patch must be a JSON object")
        dry_run = self._dry_run(request)
        with self._store.lock:
            old = self._existing(target)
            self._check_write(target, old, None)
            view = self._scale_of(old) if target.subresource == "scale" else old
            try:
                patched = apply(copy.deepcopy(view), patch)
            except PatchError as error:
                if error.code == 400:
                    raise errors.bad_request(str(error)) from None
                raise ApiError(422, "Invalid", str(error)) from None
            if not isinstance(patched, dict):
                raise errors.bad_request("the patch replaced the whole object with a non-object")
            wanted = (patched.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != view["metadata"]["resourceVersion"]:
                raise errors.conflict(rt, target.name)
            if target.subresource == "scale":
                return self._apply_scale(target, old, patched, dry_run)
            if patched.get("kind") != rt.kind or patched.get("apiVersion") != rt.api_version:
                raise errors.bad_request("a patch may not change the kind or apiVersion")
            self._check_identity(target, patched)
            new = self._prepare_update(rt, old, patched, target.subresource)
            return Reply(200, self._commit(target, old, new, dry_run))

    # Scale.

    @staticmethod
    def _scale_of(obj: Obj) -> Obj:
        metadata, spec = obj["metadata"], obj.get("spec") or {}
        scale: Obj = {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                key: metadata[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if key in metadata
            },
            "spec": {},
            "status": {
                "replicas": int((obj.get("status") or {}).get("replicas", 0)),
                "selector": str(LabelSelector.from_object(spec.get("selector"))),
            },
        }
        if spec.get("replicas", 1):
            scale["spec"]["replicas"] = spec.get("replicas", 1)
        return scale

    def _get_scale(self, target: Target, request: ApiRequest) -> Reply:
        with self._store.lock:
            return Reply(200, self._scale_of(self._existing(target)))

    def _update_scale(self, target: Target, request: ApiRequest) -> Reply:
        scale = self._decode(request, "Scale", "autoscaling/v1")
        dry_run = self._dry_run(request)
        with self._store.lock:
            old = self._existing(target)
            self._check_write(target, old, scale)
            return self._apply_scale(target, old, scale, dry_run)

    def _apply_scale(self, target: Target, old: Obj, scale: Obj, dry_run: bool) -> Reply:
        rt, name = target.rt, old["metadata"]["name"]
        scale.setdefault("metadata", {})
        if scale["metadata"].get("name") != name:
            raise errors.bad_request(
                f"the name of the object ({scale['metadata'].get('name', '')}) does not match the "
                f"name on the URL ({name})"
            )
        check_schema(rt, scale, kind="Scale", group="autoscaling")
        replicas = (scale.get("spec") or {}).get("replicas", 0)
        if replicas < 0:
            raise errors.invalid(
                rt,
                name,
                [Cause.invalid("spec.replicas", replicas, "must be greater than or equal to 0")],
                kind="Scale",
                group="autoscaling",
            )
        new = copy.deepcopy(old)
        new["spec"]["replicas"] = replicas
        if new["spec"] != old["spec"]:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        stored = self._commit(target, old, new, dry_run)
        return Reply(200, self._scale_of(stored))

    # Deletes.

    def _delete_options(self, request: ApiRequest) -> Obj:
        options: Obj = {}
        if request.body.strip():
            try:
                options = json.loads(request.body)
            except ValueError as error:
                raise errors.bad_request(f"error decoding DeleteOptions: {error}") from None
            if not isinstance(options, dict):
                raise errors.bad_request("DeleteOptions must be an object")
        if "propagationPolicy" in request.query:
            options["propagationPolicy"] = request.query["propagationPolicy"]
        if options.get("dryRun") and options["dryRun"] != ["All"]:
            raise errors.bad_request(f"dryRun: Unsupported value: {options['dryRun']}")
        if options.get("dryRun") == ["All"]:
            options["dryRun"] = True
        else:
            options["dryRun"] = self._dry_run(request)
        policy = options.get("propagationPolicy")
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise errors.bad_request(
                f'propagationPolicy: Unsupported value: "{policy}": supported values: '
                '"Foreground", "Background", "Orphan"'
            )
        return options

    @staticmethod
    def _check_preconditions(rt: ResourceType, obj: Obj, options: Obj) -> None:
        preconditions = options.get("preconditions") or {}
        metadata = obj["metadata"]
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(field)
            if wanted and wanted != metadata.get(field):
                raise errors.conflict(
                    rt,
                    metadata["name"],
                    f"Precondition failed: {label} in precondition: {wanted}, {label} in object "
                    f"meta: {metadata.get(field)}",
                )

    def _delete(self, target: Target, request: ApiRequest) -> Reply:
        options = self._delete_options(request)
        with self._store.lock:
            old = self._existing(target)
            self._check_write(target, old, None)
            self._check_preconditions(target.rt, old, options)
            deleted, finished = self._delete_one(target.rt, old, options)
        if not finished or target.rt.returns_deleted_object:
            return Reply(200, deleted)
        details: Obj = {"name": old["metadata"]["name"]}
        if target.rt.group:
            details["group"] = target.rt.group
        details["kind"] = target.rt.plural
        details["uid"] = old["metadata"]["uid"]
        return Reply(200, errors.success_status(200, details))

    def _delete_one(self, rt: ResourceType, old: Obj, options: Obj) -> tuple[Obj, bool]:
        """Deletes (or, with finalizers, marks for deletion) one object; returns the object and
        whether it is gone."""
        metadata = old["metadata"]
        namespace, name = metadata.get("namespace", ""), metadata["name"]
        if metadata.get("finalizers"):
            if options["dryRun"] or metadata.get("deletionTimestamp"):
                return old, False
            marked = copy.deepcopy(old)
            marked["metadata"]["deletionTimestamp"] = self._store.now()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._store.update(marked), False
        if options["dryRun"]:
            return old, True
        if options.get("propagationPolicy") == "Orphan":
            self._orphan_dependents(old)
        if rt.kind == "Namespace":
            for kind in ("Pod", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget"):
                for obj in self._store.list(kind, name):
                    self._store.delete(kind, name, obj["metadata"]["name"])
        return self._store.delete(rt.kind, namespace, name), True

    def _orphan_dependents(self, owner: Obj) -> None:
        """Orphan propagation: dependents lose their owner reference and stay."""
        uid = owner["metadata"]["uid"]
        namespace = owner["metadata"].get("namespace")
        for pod in self._store.list("Pod", namespace):
            ref = controller_ref(pod) or {}
            owned = ref.get("uid") == uid or (
                owner["kind"] == "Deployment"
                and ref.get("kind") == "ReplicaSet"
                and self._cluster.controller.deployment_of(ref.get("uid", "")) == uid
            )
            if owned:
                pod["metadata"]["ownerReferences"] = [
                    r for r in pod["metadata"]["ownerReferences"] if r.get("uid") != ref.get("uid")
                ]
                self._store.update(pod)

    def _delete_collection(self, target: Target, request: ApiRequest) -> Reply:
        labels, fields = self._selectors(target, request)
        options = self._delete_options(request)
        deleted = []
        with self._store.lock:
            for obj in self._store.list(target.rt.kind, target.namespace):
                if labels.matches(obj["metadata"].get("labels")) and fields.matches(obj):
                    result, _ = self._delete_one(target.rt, obj, options)
                    result.pop("kind", None)
                    result.pop("apiVersion", None)
                    deleted.append(result)
            resource_version = self._store.resource_version
        return Reply(
            200,
            {
                "kind": f"{target.rt.kind}List",
                "apiVersion": target.rt.api_version,
                "metadata": {"resourceVersion": str(resource_version)},
                "items": deleted,
            },
        )

    # Eviction.

    def _evict(self, target: Target, request: ApiRequest) -> Reply:
        assert target.name is not None
        content_type = request.headers.get("content-type", "application/json").split(";")[0]
        if content_type.strip() != "application/json":
            raise errors.unsupported_media_type(content_type)
        try:
            body = json.loads(request.body or b"null")
        except ValueError as error:
            raise errors.bad_request(
                f"couldn't get version/kind; json parse error: {error}"
            ) from None
        if not isinstance(body, dict) or body.get("kind", "Eviction") != "Eviction":
            raise errors.bad_request("the body must be a policy/v1 Eviction")
        api_version = body.get("apiVersion", "policy/v1")
        if api_version not in ("policy/v1", "policy/v1beta1"):
            raise errors.bad_request(f"unsupported Eviction apiVersion {api_version}")
        eviction = {**body, "kind": "Eviction", "apiVersion": "policy/v1"}
        eviction.setdefault("metadata", {})
        if eviction["metadata"].get("name") != target.name:
            raise errors.bad_request("name in URL does not match name in Eviction object")
        check_schema(PODS, eviction, kind="Eviction", group="policy")
        options = dict(eviction.get("deleteOptions") or {})
        options["dryRun"] = self._dry_run(request) or options.get("dryRun") == ["All"]
        with self._store.lock:
            pod = self._existing(target)
            self._check_write(target, pod, None)
            self._check_preconditions(PODS, pod, options)
            phase = (pod.get("status") or {}).get("phase", "Pending")
            exempt = phase in ("Succeeded", "Failed", "Pending") or bool(
                pod["metadata"].get("deletionTimestamp")
            )
            if not exempt:
                self._check_budgets(pod)
            if not options["dryRun"]:
                self._delete_one(PODS, pod, options)
        return Reply(201, errors.success_status(201))

    def _check_budgets(self, pod: Obj) -> None:
        namespace = pod["metadata"]["namespace"]
        labels = pod["metadata"].get("labels")
        budgets = [
            budget
            for budget in self._store.list("PodDisruptionBudget", namespace)
            if LabelSelector.from_object((budget.get("spec") or {}).get("selector")).matches(labels)
        ]
        if len(budgets) > 1:
            raise ApiError(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource "
                "does not support.",
            )
        if not budgets:
            return
        budget = budgets[0]
        status = self._cluster.controller.budget_status(budget)
        policy = (budget.get("spec") or {}).get("unhealthyPodEvictionPolicy", "IfHealthyBudget")
        if not pod_ready(pod) and (
            policy == "AlwaysAllow" or status["currentHealthy"] >= status["desiredHealthy"] > 0
        ):
            return
        if status["disruptionsAllowed"] > 0:
            return
        name = budget["metadata"]["name"]
        raise errors.too_many_requests(
            errors.PDB_VIOLATION_MESSAGE,
            [
                {
                    "reason": "DisruptionBudget",
                    "message": f"The disruption budget {name} needs {status['desiredHealthy']} "
                    f"healthy pods and has {status['currentHealthy']} currently",
                }
            ],
        )


def _at(parts: list[str], index: int) -> str | None:
    return parts[index] if len(parts) > index else None
