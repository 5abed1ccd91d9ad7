"""PodDisruptionBudgets and the eviction subresource: budget status from matching pods, 429 at
zero allowed disruptions, 201 and the pod gone when allowed, dry runs and exempt pods."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from tests.kubeapi import KubeApiServer, objects
from tests.kubeapi_tests.conftest import MANUAL_TICKS, NAMESPACE, status_of


def _eviction(name: str, **delete_options: Any) -> Any:
    return client.V1Eviction(
        metadata=client.V1ObjectMeta(name=name, namespace=NAMESPACE),
        delete_options=client.V1DeleteOptions(**delete_options) if delete_options else None,
    )


def _running_web(kube: KubeApiServer, replicas: int) -> list[dict[str, Any]]:
    kube.cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=replicas))
    kube.cluster.tick()
    kube.cluster.tick()
    return kube.cluster.list("Pod", NAMESPACE, label_selector="app=web")


@MANUAL_TICKS
@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({"min_available": 2}, (1, 3, 2, 3)),
        ({"min_available": "50%"}, (1, 3, 2, 3)),
        ({"max_unavailable": 1}, (1, 3, 2, 3)),
        ({"max_unavailable": "0%"}, (0, 3, 3, 3)),
        ({"min_available": 3}, (0, 3, 3, 3)),
    ],
)
def test_budget_status_follows_matching_pods(
    kube: KubeApiServer, policy: Any, budget: dict[str, Any], expected: tuple[int, ...]
) -> None:
    _running_web(kube, 3)
    policy.create_namespaced_pod_disruption_budget(
        NAMESPACE,
        objects.pod_disruption_budget(
            "web", namespace=NAMESPACE, selector={"app": "web"}, **budget
        ),
    )
    kube.cluster.tick()
    status = policy.read_namespaced_pod_disruption_budget("web", NAMESPACE).status
    assert (
        status.disruptions_allowed,
        status.current_healthy,
        status.desired_healthy,
        status.expected_pods,
    ) == expected
    assert status.observed_generation == 1
    assert [
        p.metadata.name for p in policy.list_pod_disruption_budget_for_all_namespaces().items
    ] == ["web"]


@MANUAL_TICKS
def test_eviction_violating_the_budget_answers_429(
    kube: KubeApiServer, core: Any, policy: Any
) -> None:
    pods = _running_web(kube, 2)
    policy.create_namespaced_pod_disruption_budget(
        NAMESPACE,
        objects.pod_disruption_budget(
            "web-budget", namespace=NAMESPACE, selector={"app": "web"}, min_available=2
        ),
    )
    name = pods[0]["metadata"]["name"]
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_pod_eviction(name, NAMESPACE, _eviction(name))
    assert caught.value.status == 429
    status = status_of(caught.value)
    assert status["reason"] == "TooManyRequests"
    assert status["message"] == "Cannot evict pod as it would violate the pod's disruption budget."
    assert status["details"]["causes"] == [
        {
            "reason": "DisruptionBudget",
            "message": "The disruption budget web-budget needs 2 healthy pods and has 2 currently",
        }
    ]
    assert kube.cluster.get("Pod", NAMESPACE, name) is not None


@MANUAL_TICKS
def test_allowed_eviction_deletes_the_pod_and_the_controller_replaces_it(
    kube: KubeApiServer, core: Any, policy: Any
) -> None:
    pods = _running_web(kube, 2)
    policy.create_namespaced_pod_disruption_budget(
        NAMESPACE,
        objects.pod_disruption_budget(
            "web", namespace=NAMESPACE, selector={"app": "web"}, min_available=1
        ),
    )
    first, second = (p["metadata"]["name"] for p in pods)
    evicted = core.create_namespaced_pod_eviction(first, NAMESPACE, _eviction(first))
    assert evicted.kind == "Status"
    assert kube.cluster.requests[-1].code == 201
    assert kube.cluster.get("Pod", NAMESPACE, first) is None
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_pod_eviction(second, NAMESPACE, _eviction(second))
    assert caught.value.status == 429, "the budget now has one healthy pod and needs one"
    kube.cluster.tick()
    kube.cluster.tick()
    assert len(kube.cluster.list("Pod", NAMESPACE, label_selector="app=web")) == 2
    core.create_namespaced_pod_eviction(second, NAMESPACE, _eviction(second))


@MANUAL_TICKS
def test_dry_run_eviction_never_deletes(kube: KubeApiServer, core: Any) -> None:
    pods = _running_web(kube, 1)
    name = pods[0]["metadata"]["name"]
    before = kube.cluster.resource_version
    core.create_namespaced_pod_eviction(name, NAMESPACE, _eviction(name), dry_run="All")
    core.create_namespaced_pod_eviction(name, NAMESPACE, _eviction(name, dry_run=["All"]))
    assert kube.cluster.get("Pod", NAMESPACE, name) is not None
    assert kube.cluster.resource_version == before


@MANUAL_TICKS
def test_pending_and_unhealthy_pods_are_evicted_despite_a_tight_budget(
    kube: KubeApiServer, core: Any
) -> None:
    pods = _running_web(kube, 3)
    kube.cluster.put(
        objects.pod_disruption_budget(
            "web", namespace=NAMESPACE, selector={"app": "web"}, min_available=2
        )
    )
    sick = pods[0]["metadata"]["name"]
    kube.cluster.set_pod_ready(NAMESPACE, sick, ready=False)
    core.create_namespaced_pod_eviction(sick, NAMESPACE, _eviction(sick))
    assert kube.cluster.get("Pod", NAMESPACE, sick) is None
    kube.cluster.put(
        objects.pod("waiting", namespace=NAMESPACE, labels={"app": "web"}, running=False)
    )
    core.create_namespaced_pod_eviction("waiting", NAMESPACE, _eviction("waiting"))
    assert kube.cluster.get("Pod", NAMESPACE, "waiting") is None


@MANUAL_TICKS
def test_eviction_of_a_missing_pod_or_mismatched_body_is_refused(
    kube: KubeApiServer, core: Any
) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_pod_eviction("ghost", NAMESPACE, _eviction("ghost"))
    assert caught.value.status == 404
    assert status_of(caught.value)["message"] == 'pods "ghost" not found'
    _running_web(kube, 1)
    name = kube.cluster.list("Pod", NAMESPACE)[0]["metadata"]["name"]
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_pod_eviction(name, NAMESPACE, _eviction("other"))
    assert caught.value.status == 400


@MANUAL_TICKS
def test_two_budgets_on_one_pod_are_an_error(kube: KubeApiServer, core: Any) -> None:
    pods = _running_web(kube, 2)
    for name in ("a", "b"):
        kube.cluster.put(
            objects.pod_disruption_budget(
                name, namespace=NAMESPACE, selector={"app": "web"}, max_unavailable=1
            )
        )
    name = pods[0]["metadata"]["name"]
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_pod_eviction(name, NAMESPACE, _eviction(name))
    assert caught.value.status == 500
    assert "more than one PodDisruptionBudget" in status_of(caught.value)["message"]


def test_budget_validation(policy: Any) -> None:
    body = objects.pod_disruption_budget(
        "web", namespace=NAMESPACE, selector={"app": "web"}, min_available=1, max_unavailable=1
    )
    with pytest.raises(client.ApiException) as caught:
        policy.create_namespaced_pod_disruption_budget(NAMESPACE, body)
    assert caught.value.status == 422
    assert "cannot be both set" in status_of(caught.value)["message"]
