"""Failure injection as a client meets it: conflicts, RBAC refusals, server errors, latency, an
unreachable server and its return; and the server used from asyncio code."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import urllib3
from kubernetes import client

from tests.kubeapi import KubeApiServer, objects
from tests.kubeapi_tests.conftest import MANUAL_TICKS, NAMESPACE, raw, status_of


@MANUAL_TICKS
def test_conflict_next_refuses_the_next_writes_then_lets_them_through(
    kube: KubeApiServer, apps: Any
) -> None:
    kube.cluster.put(objects.deployment("web", namespace=NAMESPACE))
    kube.cluster.conflict_next("Deployment", NAMESPACE, "web", times=2)
    for _ in range(2):
        with pytest.raises(client.ApiException) as caught:
            apps.patch_namespaced_deployment("web", NAMESPACE, {"spec": {"replicas": 3}})
        assert caught.value.status == 409
        assert status_of(caught.value)["reason"] == "Conflict"
    assert kube.cluster.require("Deployment", NAMESPACE, "web")["spec"]["replicas"] == 1
    assert (
        apps.patch_namespaced_deployment("web", NAMESPACE, {"spec": {"replicas": 3}}).spec.replicas
        == 3
    )
    kube.cluster.conflict_next("deployments", NAMESPACE, "web")
    with pytest.raises(client.ApiException):
        apps.patch_namespaced_deployment_scale("web", NAMESPACE, {"spec": {"replicas": 4}})


def test_forbidden_verbs_answer_the_rbac_refusal(kube: KubeApiServer, apps: Any, core: Any) -> None:
    kube.cluster.put(objects.deployment("web", namespace=NAMESPACE))
    kube.cluster.forbid("patch", "deployments")
    with pytest.raises(client.ApiException) as caught:
        apps.patch_namespaced_deployment("web", NAMESPACE, {"spec": {"replicas": 3}})
    assert caught.value.status == 403
    status = status_of(caught.value)
    assert status["reason"] == "Forbidden"
    assert status["message"] == (
        'deployments.apps "web" is forbidden: User "system:serviceaccount:sentinel:executor" '
        'cannot patch resource "deployments" in API group "apps" in the namespace "ml"'
    )
    assert apps.read_namespaced_deployment("web", NAMESPACE).metadata.name == "web"

    kube.cluster.forbid("create", "pods/eviction", namespace=NAMESPACE)
    kube.cluster.forbid("list", "nodes")
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_pod_eviction(
            "x", NAMESPACE, client.V1Eviction(metadata=client.V1ObjectMeta(name="x"))
        )
    assert (
        'cannot create resource "pods/eviction" in API group ""'
        in status_of(caught.value)["message"]
    )
    with pytest.raises(client.ApiException) as caught:
        core.list_node()
    assert status_of(caught.value)["message"] == (
        'nodes is forbidden: User "system:serviceaccount:sentinel:executor" cannot list '
        'resource "nodes" in API group "" at the cluster scope'
    )
    kube.cluster.allow("patch", "deployments")
    apps.patch_namespaced_deployment("web", NAMESPACE, {"spec": {"replicas": 3}})


def test_injected_server_errors_are_answered_once(
    kube: KubeApiServer, core: Any, apps: Any
) -> None:
    kube.cluster.fail_next("list", "nodes")
    with pytest.raises(client.ApiException) as caught:
        core.list_node()
    assert caught.value.status == 500
    assert status_of(caught.value)["reason"] == "InternalError"
    assert len(core.list_node().items) == 3

    # urllib3 would retry an idempotent request answered with Retry-After; a create is not.
    kube.cluster.fail_next(
        "create",
        "deployments",
        code=429,
        reason="TooManyRequests",
        message="storage is (re)initializing",
        retry_after_seconds=1,
    )
    body = objects.deployment("web", namespace=NAMESPACE)
    with pytest.raises(client.ApiException) as caught:
        apps.create_namespaced_deployment(NAMESPACE, body)
    assert caught.value.status == 429
    assert (caught.value.headers or {})["Retry-After"] == "1"
    assert status_of(caught.value)["details"] == {"retryAfterSeconds": 1}
    apps.create_namespaced_deployment(NAMESPACE, body)


def test_latency_slows_every_request(kube: KubeApiServer, core: Any) -> None:
    kube.cluster.set_latency(0.3)
    started = time.monotonic()
    core.list_node()
    assert time.monotonic() - started >= 0.3
    kube.cluster.set_latency(0)


def test_stopped_server_is_unreachable_and_comes_back_with_its_state(
    kube: KubeApiServer, core: Any
) -> None:
    url = kube.url
    core.list_node()  # leaves a kept-alive connection in the client's pool
    kube.stop()
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.list_node(_request_timeout=2)
    kube.start()
    assert kube.url == url
    assert [n.metadata.name for n in core.list_node().items] == ["gpu-0", "gpu-1", "gpu-2"]


def test_requests_without_a_token_can_be_refused(kube: KubeApiServer) -> None:
    kube.cluster.require_token = True
    code, status = raw(kube, "GET", "/api/v1/nodes")
    assert (code, status["reason"]) == (401, "Unauthorized")


async def test_server_serves_asyncio_code_through_threads(tmp_path: Any) -> None:
    from tests.kubeapi import write_kubeconfig
    from tests.kubeapi_tests.conftest import new_client

    with KubeApiServer() as kube:
        kube.cluster.add_node("gpu-0")
        path = write_kubeconfig(tmp_path / "kubeconfig", {"async": kube.url})
        api = new_client(path)
        try:
            core = client.CoreV1Api(api)
            nodes = await asyncio.to_thread(core.list_node)
            assert [n.metadata.name for n in nodes.items] == ["gpu-0"]
            kube.cluster.put(objects.deployment("web", namespace="default"))
            deadline = asyncio.get_running_loop().time() + 10

            def available() -> int:
                stored = kube.cluster.require("Deployment", "default", "web")
                return int((stored.get("status") or {}).get("availableReplicas", 0))

            while not available():
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        finally:
            api.close()
