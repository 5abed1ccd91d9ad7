"""The resource types this test API server serves, and the discovery documents (`/api`, `/apis`,
`/apis/{group}/{version}`) that describe them to clients such as kubectl."""

from __future__ import annotations

import dataclasses
from typing import Any

Obj = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sentinel-test",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.4",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclasses.dataclass(frozen=True)
class Subresource:
    """A subresource (`deployments/scale`) as discovery lists it."""

    name: str
    kind: str
    verbs: tuple[str, ...]
    group: str | None = None
    version: str | None = None


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One served resource: its REST names, scope, verbs and storage rules."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    verbs: tuple[str, ...] = ALL_VERBS
    short_names: tuple[str, ...] = ()
    subresources: tuple[Subresource, ...] = ()
    categories: tuple[str, ...] = ()
    # Field labels accepted by fieldSelector, besides metadata.name and metadata.namespace.
    field_labels: tuple[str, ...] = ()
    # Writes to the main resource keep the stored status (a status subresource exists).
    has_status: bool = True
    # metadata.generation is bumped when the spec changes.
    tracks_generation: bool = False
    # DELETE answers with the deleted object instead of a Status.
    returns_deleted_object: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`deployments.apps`, `pods`: how messages name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def subresource(self, name: str) -> Subresource | None:
        return next((sub for sub in self.subresources if sub.name == name), None)

    def discovery(self) -> list[Obj]:
        main: Obj = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in self.subresources:
            entry: Obj = {
                "name": f"{self.plural}/{sub.name}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": sub.kind,
                "verbs": list(sub.verbs),
            }
            if sub.group is not None:
                entry["group"] = sub.group
                entry["version"] = sub.version
            entries.append(entry)
        return entries


_STATUS = Subresource("status", "", ("get", "patch", "update"))


def _status(kind: str) -> Subresource:
    return dataclasses.replace(_STATUS, kind=kind)


def _scale() -> Subresource:
    return Subresource("scale", "Scale", ("get", "patch", "update"), "autoscaling", "v1")


NAMESPACES = ResourceType(
    "",
    "v1",
    "namespaces",
    "namespace",
    "Namespace",
    namespaced=False,
    verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
    short_names=("ns",),
    subresources=(_status("Namespace"),),
    field_labels=("status.phase",),
)
NODES = ResourceType(
    "",
    "v1",
    "nodes",
    "node",
    "Node",
    namespaced=False,
    short_names=("no",),
    subresources=(_status("Node"),),
    field_labels=("spec.unschedulable",),
)
PODS = ResourceType(
    "",
    "v1",
    "pods",
    "pod",
    "Pod",
    namespaced=True,
    short_names=("po",),
    categories=("all",),
    subresources=(
        _status("Pod"),
        Subresource("eviction", "Eviction", ("create",), "policy", "v1"),
    ),
    field_labels=(
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ),
    returns_deleted_object=True,
)
SERVICES = ResourceType(
    "",
    "v1",
    "services",
    "service",
    "Service",
    namespaced=True,
    verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    short_names=("svc",),
    categories=("all",),
    subresources=(_status("Service"),),
    returns_deleted_object=True,
)
DEPLOYMENTS = ResourceType(
    "apps",
    "v1",
    "deployments",
    "deployment",
    "Deployment",
    namespaced=True,
    short_names=("deploy",),
    categories=("all",),
    subresources=(_scale(), _status("Deployment")),
    tracks_generation=True,
)
STATEFULSETS = ResourceType(
    "apps",
    "v1",
    "statefulsets",
    "statefulset",
    "StatefulSet",
    namespaced=True,
    short_names=("sts",),
    categories=("all",),
    subresources=(_scale(), _status("StatefulSet")),
    tracks_generation=True,
)
PODDISRUPTIONBUDGETS = ResourceType(
    "policy",
    "v1",
    "poddisruptionbudgets",
    "poddisruptionbudget",
    "PodDisruptionBudget",
    namespaced=True,
    short_names=("pdb",),
    subresources=(_status("PodDisruptionBudget"),),
    tracks_generation=True,
)

RESOURCES: tuple[ResourceType, ...] = (
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    DEPLOYMENTS,
    STATEFULSETS,
    PODDISRUPTIONBUDGETS,
)
# Groups served, with the versions of each. autoscaling/v1 only names the Scale kind of the
# scale subresources: it is answered when asked for but left out of /apis, because kubectl's
# discovery treats a group version without resources as a failure.
GROUPS: dict[str, tuple[str, ...]] = {"apps": ("v1",), "policy": ("v1",), "autoscaling": ("v1",)}
LISTED_GROUPS = ("apps", "policy")


def by_path(group: str, version: str, plural: str) -> ResourceType | None:
    return next(
        (
            rt
            for rt in RESOURCES
            if rt.group == group and rt.version == version and rt.plural == plural
        ),
        None,
    )


def by_kind(kind: str) -> ResourceType:
    """The type for a Kind (`Deployment`) or plural (`deployments`); KeyError when unknown."""
    lowered = kind.lower()
    for rt in RESOURCES:
        if lowered in (rt.kind.lower(), rt.plural, rt.singular, *rt.short_names):
            return rt
    raise KeyError(f"unknown kind {kind!r}; served: {[rt.kind for rt in RESOURCES]}")


def api_versions(server_address: str) -> Obj:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def api_group(name: str) -> Obj:
    versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in GROUPS[name]]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": versions,
        "preferredVersion": versions[0],
    }


def api_group_list() -> Obj:
    groups = [api_group(name) for name in LISTED_GROUPS]
    for group in groups:
        del group["kind"], group["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def resource_list(group: str, version: str) -> Obj | None:
    if group and version not in GROUPS.get(group, ()):
        return None
    if not group and version != "v1":
        return None
    resources = [
        entry
        for rt in RESOURCES
        if rt.group == group and rt.version == version
        for entry in rt.discovery()
    ]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


@dataclasses.dataclass(frozen=True)
class Target:
    """What a REST path names: a resource type, and a namespace, object and subresource."""

    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None
