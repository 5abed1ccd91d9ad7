"""The verbs through the official client: create, read, list, replace, patch, delete, the scale
and status subresources, the error Status shapes, validation, dry runs and resourceVersions."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from tests.kubeapi import KubeApiServer, objects
from tests.kubeapi_tests.conftest import MANUAL_TICKS, NAMESPACE, raw, status_of


def _create(apps: Any, name: str = "web", **kwargs: Any) -> Any:
    return apps.create_namespaced_deployment(
        NAMESPACE, objects.deployment(name, namespace=NAMESPACE, **kwargs)
    )


def test_created_deployment_reads_back_with_server_fields_and_defaults(apps: Any) -> None:
    created = _create(apps, replicas=2)
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation == 1
    assert int(created.metadata.resource_version) > 0
    assert created.spec.strategy.type == "RollingUpdate"
    assert created.spec.strategy.rolling_update.max_surge == "25%"
    assert created.spec.progress_deadline_seconds == 600
    assert created.spec.template.spec.containers[0].image_pull_policy == "IfNotPresent"

    read = apps.read_namespaced_deployment("web", NAMESPACE)
    assert read.metadata.uid == created.metadata.uid
    assert read.spec.replicas == 2


def test_lists_filter_by_namespace_labels_and_name(apps: Any, kube: KubeApiServer) -> None:
    _create(apps, "web", labels={"app": "web", "tier": "front"})
    _create(apps, "api", labels={"app": "api", "tier": "back"})
    kube.cluster.put(objects.deployment("other", namespace="default"))

    def names(items: list[Any]) -> list[str]:
        return sorted(d.metadata.name for d in items)

    assert names(apps.list_namespaced_deployment(NAMESPACE).items) == ["api", "web"]
    assert names(apps.list_deployment_for_all_namespaces().items) == ["api", "other", "web"]
    assert names(
        apps.list_namespaced_deployment(NAMESPACE, label_selector="tier in (front,edge)").items
    ) == ["web"]
    assert names(
        apps.list_namespaced_deployment(NAMESPACE, label_selector="tier!=front").items
    ) == ["api"]
    assert names(
        apps.list_deployment_for_all_namespaces(field_selector="metadata.name=other").items
    ) == ["other"]
    listed = apps.list_namespaced_deployment(NAMESPACE)
    assert int(listed.metadata.resource_version) == kube.cluster.resource_version


def test_list_pages_with_limit_and_continue(apps: Any) -> None:
    for name in ("a", "b", "c"):
        _create(apps, name)
    first = apps.list_namespaced_deployment(NAMESPACE, limit=2)
    assert [d.metadata.name for d in first.items] == ["a", "b"]
    rest = apps.list_namespaced_deployment(NAMESPACE, limit=2, _continue=first.metadata._continue)
    assert [d.metadata.name for d in rest.items] == ["c"]
    assert not rest.metadata._continue


def test_missing_object_answers_a_not_found_status(apps: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        apps.read_namespaced_deployment("absent", NAMESPACE)
    assert caught.value.status == 404
    assert status_of(caught.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "absent" not found',
        "reason": "NotFound",
        "details": {"name": "absent", "group": "apps", "kind": "deployments"},
        "code": 404,
    }


def test_creating_twice_answers_already_exists(apps: Any) -> None:
    _create(apps)
    with pytest.raises(client.ApiException) as caught:
        _create(apps)
    assert caught.value.status == 409
    status = status_of(caught.value)
    assert status["reason"] == "AlreadyExists"
    assert status["message"] == 'deployments.apps "web" already exists'


def test_creating_in_a_missing_namespace_is_refused(apps: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        apps.create_namespaced_deployment("nowhere", objects.deployment("web", namespace="nowhere"))
    assert caught.value.status == 404
    assert status_of(caught.value)["message"] == 'namespaces "nowhere" not found'


def test_stale_resource_version_on_replace_answers_conflict(apps: Any) -> None:
    created = _create(apps)
    apps.patch_namespaced_deployment("web", NAMESPACE, {"metadata": {"labels": {"x": "1"}}})
    stale = created
    stale.spec.replicas = 5
    with pytest.raises(client.ApiException) as caught:
        apps.replace_namespaced_deployment("web", NAMESPACE, stale)
    assert caught.value.status == 409
    status = status_of(caught.value)
    assert status["reason"] == "Conflict"
    assert status["message"] == (
        'Operation cannot be fulfilled on deployments.apps "web": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )


@MANUAL_TICKS
def test_replace_with_current_resource_version_succeeds_and_bumps_generation(apps: Any) -> None:
    current = _create(apps)
    current.spec.replicas = 4
    replaced = apps.replace_namespaced_deployment("web", NAMESPACE, current)
    assert replaced.spec.replicas == 4
    assert replaced.metadata.generation == 2
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)


def test_misspelled_field_is_refused_as_invalid(deployments: Any) -> None:
    body = objects.deployment("web", namespace=NAMESPACE)
    body["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(client.ApiException) as caught:
        deployments.create(body=body, namespace=NAMESPACE)
    assert caught.value.status == 422
    status = status_of(caught.value)
    assert status["reason"] == "Invalid"
    assert "'imagePullPolicyy' was unexpected" in status["message"]
    assert status["details"]["causes"][0]["field"] == (
        "spec.template.spec.containers[0].imagePullPolicyy"
    )
    assert status["details"]["kind"] == "Deployment"


def test_wrong_type_and_misspelled_patch_are_refused_as_invalid(deployments: Any) -> None:
    body = objects.deployment("web", namespace=NAMESPACE)
    body["spec"]["replicas"] = "three"
    with pytest.raises(client.ApiException) as caught:
        deployments.create(body=body, namespace=NAMESPACE)
    assert caught.value.status == 422
    assert status_of(caught.value)["details"]["causes"][0]["field"] == "spec.replicas"

    deployments.create(body=objects.deployment("web", namespace=NAMESPACE), namespace=NAMESPACE)
    with pytest.raises(client.ApiException) as caught:
        deployments.patch(
            name="web",
            namespace=NAMESPACE,
            body={"spec": {"replica": 3}},
            content_type="application/merge-patch+json",
        )
    assert caught.value.status == 422
    assert status_of(caught.value)["details"]["causes"][0]["field"] == "spec.replica"


def test_semantic_rules_of_deployments_are_enforced(apps: Any) -> None:
    mismatched = objects.deployment("web", namespace=NAMESPACE)
    mismatched["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    negative = objects.deployment("web", namespace=NAMESPACE, replicas=-1)
    for body, field in (
        (mismatched, "spec.template.metadata.labels"),
        (negative, "spec.replicas"),
    ):
        with pytest.raises(client.ApiException) as caught:
            apps.create_namespaced_deployment(NAMESPACE, body)
        assert caught.value.status == 422
        assert status_of(caught.value)["details"]["causes"][0]["field"] == field

    _create(apps)
    with pytest.raises(client.ApiException) as caught:
        apps.patch_namespaced_deployment(
            "web", NAMESPACE, {"spec": {"selector": {"matchLabels": {"app": "web", "v": "2"}}}}
        )
    assert caught.value.status == 422
    assert "spec.selector" in status_of(caught.value)["message"]
    assert "field is immutable" in status_of(caught.value)["message"]


def test_name_and_namespace_in_body_must_match_the_url(apps: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        apps.create_namespaced_deployment(NAMESPACE, objects.deployment("web", namespace="default"))
    assert caught.value.status == 400
    assert "does not match the namespace" in status_of(caught.value)["message"]
    _create(apps)
    with pytest.raises(client.ApiException) as caught:
        apps.replace_namespaced_deployment(
            "web", NAMESPACE, objects.deployment("api", namespace=NAMESPACE)
        )
    assert caught.value.status == 400
    assert status_of(caught.value)["message"] == (
        "the name of the object (api) does not match the name on the URL (web)"
    )


def test_merge_patch_replaces_the_container_list(apps: Any) -> None:
    body = objects.deployment("web", namespace=NAMESPACE)
    body["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "proxy:1"})
    apps.create_namespaced_deployment(NAMESPACE, body)
    patched = apps.patch_namespaced_deployment(
        "web",
        NAMESPACE,
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "main", "image": "repo/model:2"}]}}
            }
        },
        _content_type="application/merge-patch+json",
    )
    assert [(c.name, c.image) for c in patched.spec.template.spec.containers] == [
        ("main", "repo/model:2")
    ]
    assert patched.metadata.generation == 2


def test_strategic_merge_patch_merges_containers_by_name(apps: Any) -> None:
    body = objects.deployment("web", namespace=NAMESPACE)
    body["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "proxy:1"})
    apps.create_namespaced_deployment(NAMESPACE, body)
    patched = apps.patch_namespaced_deployment(
        "web",
        NAMESPACE,
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "main", "image": "repo/model:2"}]}}
            }
        },
    )
    assert [(c.name, c.image) for c in patched.spec.template.spec.containers] == [
        ("main", "repo/model:2"),
        ("sidecar", "proxy:1"),
    ]


def test_json_patch_applies_operations(apps: Any) -> None:
    _create(apps)
    patched = apps.patch_namespaced_deployment(
        "web",
        NAMESPACE,
        [
            {"op": "test", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "m:3"},
            {"op": "add", "path": "/metadata/annotations", "value": {"owner": "sentinel"}},
        ],
    )
    assert patched.spec.template.spec.containers[0].image == "m:3"
    assert patched.metadata.annotations["owner"] == "sentinel"


def test_patch_carrying_a_stale_resource_version_answers_conflict(apps: Any) -> None:
    created = _create(apps)
    apps.patch_namespaced_deployment("web", NAMESPACE, {"spec": {"replicas": 2}})
    with pytest.raises(client.ApiException) as caught:
        apps.patch_namespaced_deployment(
            "web",
            NAMESPACE,
            {"metadata": {"resourceVersion": created.metadata.resource_version}},
        )
    assert caught.value.status == 409


@MANUAL_TICKS
def test_metadata_changes_do_not_bump_generation_and_no_op_writes_store_nothing(
    apps: Any, kube: KubeApiServer
) -> None:
    _create(apps)
    labelled = apps.patch_namespaced_deployment(
        "web", NAMESPACE, {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled.metadata.generation == 1
    before = kube.cluster.resource_version
    again = apps.patch_namespaced_deployment("web", NAMESPACE, {"metadata": {"labels": {"a": "b"}}})
    assert again.metadata.resource_version == labelled.metadata.resource_version
    assert kube.cluster.resource_version == before


@MANUAL_TICKS  # a status write between read and replace would (rightly) conflict
def test_scale_subresource_reads_and_writes_replicas(apps: Any) -> None:
    _create(apps, replicas=2)
    scale = apps.read_namespaced_deployment_scale("web", NAMESPACE)
    assert scale.kind == "Scale" and scale.api_version == "autoscaling/v1"
    assert scale.spec.replicas == 2
    assert scale.status.selector == "app=web"

    scale.spec.replicas = 3
    assert apps.replace_namespaced_deployment_scale("web", NAMESPACE, scale).spec.replicas == 3
    patched = apps.patch_namespaced_deployment_scale("web", NAMESPACE, {"spec": {"replicas": 4}})
    assert patched.spec.replicas == 4
    deployment = apps.read_namespaced_deployment("web", NAMESPACE)
    assert deployment.spec.replicas == 4
    assert deployment.metadata.generation == 3

    with pytest.raises(client.ApiException) as caught:
        apps.patch_namespaced_deployment_scale("web", NAMESPACE, {"spec": {"replicas": -1}})
    assert caught.value.status == 422
    assert status_of(caught.value)["message"].startswith('Scale.autoscaling "web" is invalid')


@MANUAL_TICKS  # no controller writing status meanwhile
def test_status_subresource_writes_only_status(apps: Any) -> None:
    created = _create(apps)
    created.status = client.V1DeploymentStatus(replicas=7, observed_generation=1)
    created.spec.replicas = 9
    written = apps.replace_namespaced_deployment_status("web", NAMESPACE, created)
    assert written.status.replicas == 7
    assert written.spec.replicas == 1
    assert apps.read_namespaced_deployment_status("web", NAMESPACE).status.replicas == 7
    ignored = apps.patch_namespaced_deployment("web", NAMESPACE, {"status": {"replicas": 1}})
    assert ignored.status.replicas == 7


def test_delete_answers_success_and_the_object_is_gone(apps: Any) -> None:
    created = _create(apps)
    status = apps.delete_namespaced_deployment("web", NAMESPACE)  # the client returns a dict
    assert status["kind"] == "Status" and status["status"] == "Success"
    assert status["details"] == {
        "name": "web",
        "group": "apps",
        "kind": "deployments",
        "uid": created.metadata.uid,
    }
    with pytest.raises(client.ApiException) as caught:
        apps.read_namespaced_deployment("web", NAMESPACE)
    assert caught.value.status == 404


def test_delete_precondition_on_resource_version(apps: Any) -> None:
    created = _create(apps)
    apps.patch_namespaced_deployment("web", NAMESPACE, {"spec": {"replicas": 2}})
    with pytest.raises(client.ApiException) as caught:
        apps.delete_namespaced_deployment(
            "web",
            NAMESPACE,
            body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(
                    resource_version=created.metadata.resource_version
                )
            ),
        )
    assert caught.value.status == 409
    assert "Precondition failed" in status_of(caught.value)["message"]


@MANUAL_TICKS
def test_dry_run_validates_but_never_stores(apps: Any, kube: KubeApiServer) -> None:
    before = kube.cluster.resource_version
    would_be = apps.create_namespaced_deployment(
        NAMESPACE, objects.deployment("web", namespace=NAMESPACE), dry_run="All"
    )
    assert would_be.metadata.uid and not would_be.metadata.resource_version
    assert kube.cluster.get("Deployment", NAMESPACE, "web") is None
    bad = objects.deployment("web", namespace=NAMESPACE, replicas=-1)
    with pytest.raises(client.ApiException) as caught:
        apps.create_namespaced_deployment(NAMESPACE, bad, dry_run="All")
    assert caught.value.status == 422
    assert kube.cluster.resource_version == before

    stored = _create(apps)
    version = kube.cluster.resource_version
    stored.spec.replicas = 3
    assert (
        apps.replace_namespaced_deployment("web", NAMESPACE, stored, dry_run="All").spec.replicas
        == 3
    )
    patched = apps.patch_namespaced_deployment(
        "web", NAMESPACE, {"spec": {"replicas": 5}}, dry_run="All"
    )
    assert patched.spec.replicas == 5
    apps.patch_namespaced_deployment_scale(
        "web", NAMESPACE, {"spec": {"replicas": 6}}, dry_run="All"
    )
    apps.delete_namespaced_deployment("web", NAMESPACE, dry_run="All")
    assert kube.cluster.require("Deployment", NAMESPACE, "web")["spec"]["replicas"] == 1
    assert kube.cluster.resource_version == version


def test_field_manager_is_recorded_per_request(apps: Any, kube: KubeApiServer) -> None:
    apps.create_namespaced_deployment(
        NAMESPACE, objects.deployment("web", namespace=NAMESPACE), field_manager="sentinel"
    )
    apps.patch_namespaced_deployment_scale(
        "web", NAMESPACE, {"spec": {"replicas": 2}}, field_manager="sentinel-scale"
    )
    writes = [
        (r.verb, r.path, r.field_manager, r.resource, r.code)
        for r in kube.cluster.requests
        if r.verb in ("create", "patch")
    ]
    assert writes == [
        (
            "create",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
            "sentinel",
            "deployments",
            201,
        ),
        (
            "patch",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/web/scale",
            "sentinel-scale",
            "deployments/scale",
            200,
        ),
    ]


def test_services_keep_their_allocated_cluster_ip(core: Any) -> None:
    created = core.create_namespaced_service(NAMESPACE, objects.service("web", namespace=NAMESPACE))
    address = created.spec.cluster_ip
    assert address.startswith("10.96.")
    assert created.spec.ports[0].target_port == 80
    replaced = core.replace_namespaced_service(
        "web",
        NAMESPACE,
        {
            **objects.service("web", namespace=NAMESPACE, port=8080),
            "metadata": {"name": "web", "namespace": NAMESPACE},
        },
    )
    assert replaced.spec.cluster_ip == address
    assert replaced.spec.ports[0].port == 8080
    patched = core.patch_namespaced_service("web", NAMESPACE, {"metadata": {"labels": {"a": "b"}}})
    assert patched.metadata.labels == {"a": "b"}
    deleted = core.delete_namespaced_service("web", NAMESPACE)
    assert deleted.metadata.name == "web"
    assert core.list_namespaced_service(NAMESPACE).items == []


def test_nodes_are_cluster_scoped_and_can_be_cordoned(core: Any) -> None:
    nodes = core.list_node()
    assert [n.metadata.name for n in nodes.items] == ["gpu-0", "gpu-1", "gpu-2"]
    cordoned = core.patch_node("gpu-1", {"spec": {"unschedulable": True}})
    assert cordoned.spec.unschedulable is True
    assert [
        n.metadata.name for n in core.list_node(field_selector="spec.unschedulable=false").items
    ] == ["gpu-0", "gpu-2"]
    node = core.read_node("gpu-0")
    node.metadata.labels["sentinel.dev/drained"] = "false"
    assert core.replace_node("gpu-0", node).metadata.labels["sentinel.dev/drained"] == "false"


def test_pods_are_listed_by_node_and_labels(apps: Any, core: Any, kube: KubeApiServer) -> None:
    kube.cluster.put(
        objects.pod("agent-a", namespace="kube-system", node="gpu-0", labels={"k": "agent"})
    )
    kube.cluster.put(
        objects.pod("agent-b", namespace="kube-system", node="gpu-1", labels={"k": "agent"})
    )
    kube.cluster.put(objects.pod("job", namespace=NAMESPACE, node="gpu-0", labels={"k": "job"}))
    on_node = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=gpu-0")
    assert sorted(p.metadata.name for p in on_node.items) == ["agent-a", "job"]
    agents = core.list_namespaced_pod("kube-system", label_selector="k=agent")
    assert sorted(p.metadata.name for p in agents.items) == ["agent-a", "agent-b"]
    assert core.read_namespaced_pod("job", NAMESPACE).spec.node_name == "gpu-0"
    deleted = core.delete_namespaced_pod("job", NAMESPACE)
    assert deleted.metadata.name == "job"
    with pytest.raises(client.ApiException) as caught:
        core.list_pod_for_all_namespaces(field_selector="spec.colour=blue")
    assert caught.value.status == 400
    assert status_of(caught.value)["message"] == "field label not supported: spec.colour"


def test_statefulsets_support_the_same_verbs(apps: Any) -> None:
    created = apps.create_namespaced_stateful_set(
        NAMESPACE, objects.statefulset("db", namespace=NAMESPACE, replicas=2)
    )
    assert created.spec.pod_management_policy == "OrderedReady"
    assert apps.read_namespaced_stateful_set_scale("db", NAMESPACE).spec.replicas == 2
    apps.patch_namespaced_stateful_set_scale("db", NAMESPACE, {"spec": {"replicas": 3}})
    assert apps.read_namespaced_stateful_set("db", NAMESPACE).metadata.generation == 2
    with pytest.raises(client.ApiException) as caught:
        apps.patch_namespaced_stateful_set("db", NAMESPACE, {"spec": {"serviceName": "other"}})
    assert caught.value.status == 422
    apps.delete_namespaced_stateful_set("db", NAMESPACE)
    assert apps.list_namespaced_stateful_set(NAMESPACE).items == []


def test_unknown_paths_and_verbs_are_refused(kube: KubeApiServer) -> None:
    for method, path, code, reason in (
        ("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/replicasets", 404, "NotFound"),
        ("POST", "/apis/apps/v1/deployments", 405, "MethodNotAllowed"),
        ("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/x/eviction", 405, "MethodNotAllowed"),
    ):
        answered, status = raw(kube, method, path, {} if method == "POST" else None)
        assert (answered, status["reason"]) == (code, reason), path


def test_unsupported_patch_type_is_refused(kube: KubeApiServer, apps: Any) -> None:
    _create(apps)
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/web"
    code, status = raw(kube, "PATCH", path, {"spec": {}}, content_type="text/plain")
    assert (code, status["reason"]) == (415, "UnsupportedMediaType")


@MANUAL_TICKS
def test_finalizers_hold_deletion_until_removed(apps: Any, kube: KubeApiServer) -> None:
    body = objects.deployment("web", namespace=NAMESPACE)
    body["metadata"]["finalizers"] = ["sentinel.dev/hold"]
    apps.create_namespaced_deployment(NAMESPACE, body)
    marked = apps.delete_namespaced_deployment("web", NAMESPACE)
    assert marked["metadata"]["deletionTimestamp"]
    assert kube.cluster.require("Deployment", NAMESPACE, "web")["metadata"]["deletionTimestamp"]
    apps.patch_namespaced_deployment("web", NAMESPACE, {"metadata": {"finalizers": None}})
    assert kube.cluster.get("Deployment", NAMESPACE, "web") is None


def test_namespaces_are_served_and_deleting_one_removes_its_objects(
    core: Any, apps: Any, kube: KubeApiServer
) -> None:
    created = core.create_namespace({"metadata": {"name": "scratch"}})
    assert created.status.phase == "Active"
    assert created.metadata.labels["kubernetes.io/metadata.name"] == "scratch"
    apps.create_namespaced_deployment("scratch", objects.deployment("tmp", namespace="scratch"))
    assert "scratch" in [n.metadata.name for n in core.list_namespace().items]
    core.delete_namespace("scratch")
    assert kube.cluster.get("Namespace", None, "scratch") is None
    assert kube.cluster.list("Deployment", "scratch") == []


def test_discovery_describes_the_served_resources(kube: KubeApiServer) -> None:
    assert raw(kube, "GET", "/version")[1]["gitVersion"].startswith("v1.32")
    assert raw(kube, "GET", "/api")[1]["versions"] == ["v1"]
    groups = raw(kube, "GET", "/apis")[1]
    assert [g["name"] for g in groups["groups"]] == ["apps", "policy"]
    apps_v1 = {r["name"]: r for r in raw(kube, "GET", "/apis/apps/v1")[1]["resources"]}
    assert apps_v1["deployments"]["verbs"] == [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ]
    assert apps_v1["deployments/scale"]["group"] == "autoscaling"
    assert apps_v1["deployments/scale"]["kind"] == "Scale"
    core_v1 = {r["name"]: r for r in raw(kube, "GET", "/api/v1")[1]["resources"]}
    assert core_v1["nodes"]["namespaced"] is False
    assert core_v1["pods/eviction"]["kind"] == "Eviction"
    policy_v1 = raw(kube, "GET", "/apis/policy/v1")[1]
    assert policy_v1["resources"][0]["name"] == "poddisruptionbudgets"
    assert raw(kube, "GET", "/apis/autoscaling/v1")[1]["groupVersion"] == "autoscaling/v1"
    assert raw(kube, "GET", "/openapi/v2")[0] == 404
