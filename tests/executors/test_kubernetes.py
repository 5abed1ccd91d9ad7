"""The Kubernetes executor driven by the real plan desk and pipeline controller, through the
official `kubernetes` client, against Kubernetes API test servers (tests/kubeapi; no real API
server can be installed on these machines): scale through the scale subresource, rolling
rollouts judged as `kubectl rollout status` does, restart, cordon and drain through the Eviction
API, rollback to what was recorded before acting, conflicts, refusals and unreachable clusters."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any

import pytest

from controlplane.executors import FIELD_MANAGER, KubeClusters, KubernetesExecutor, StepRun
from controlplane.plans import HealthGate, Phase, PlanInvalid, StepState
from tests.executors.conftest import NAMESPACE, Rig, node, plan, workload
from tests.kubeapi import KubeApiServer
from tests.kubeapi.objects import deployment, pod, pod_disruption_budget, service


def _deployment(kube: KubeApiServer, name: str) -> dict[str, Any]:
    found = kube.cluster.get("Deployment", NAMESPACE, name)
    assert found is not None
    return found


def _image(kube: KubeApiServer, name: str) -> str:
    return str(_deployment(kube, name)["spec"]["template"]["spec"]["containers"][0]["image"])


def _ready(kube: KubeApiServer, name: str, replicas: int) -> None:
    def check() -> bool:
        status = _deployment(kube, name).get("status", {})
        return bool(status.get("availableReplicas") == replicas)

    kube.cluster.wait_for(check, timeout=10)


def _writes(kube: KubeApiServer, resource: str) -> list[Any]:
    return [r for r in kube.cluster.requests if r.resource == resource and r.verb == "update"]


async def test_scale_goes_through_the_scale_subresource_and_is_annotated(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2))
    _ready(kube, "llm", 2)
    done = await rig.run(plan(("scale", [workload("llm")], {"replicas": 4})))
    assert done.phase == Phase.COMPLETED, done.status_message
    stored = _deployment(kube, "llm")
    assert stored["spec"]["replicas"] == 4
    assert stored["status"]["availableReplicas"] == 4
    annotations = stored["metadata"]["annotations"]
    assert annotations["sentinel.io/plan"] == done.plan_id
    assert annotations["sentinel.io/step"] == "0"
    assert json.loads(annotations["sentinel.io/change"])["previous"] == {"replicas": 2}
    scale_writes = _writes(kube, "deployments/scale")
    assert len(scale_writes) == 1
    assert {r.field_manager for r in [*scale_writes, *_writes(kube, "deployments")]} == {
        FIELD_MANAGER
    }
    result = done.steps[0].node_results[0]
    assert result.node_id == f"k8s/lab/{NAMESPACE}/Deployment/llm"
    assert result.output["previous"] == {"replicas": 2}


async def test_a_rolling_rollout_completes_and_a_later_failure_restores_the_recorded_spec(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=3, image="repo/llm:1"))
    _ready(kube, "llm", 3)
    kube.cluster.put(deployment("asr", namespace=NAMESPACE, replicas=1, image="repo/asr:1"))
    kube.cluster.mark_broken_image("repo/asr:2")
    kube.cluster.update(
        "Deployment",
        NAMESPACE,
        "asr",
        lambda obj: obj["spec"].__setitem__("progressDeadlineSeconds", 2),
    )
    done = await rig.run(
        plan(
            (
                "rollout",
                [workload("llm")],
                {
                    "container": "main",
                    "image": "repo/llm:2",
                    "env": {"MODEL": "v2"},
                    "max_surge": 1,
                },
            ),
            ("rollout", [workload("asr")], {"container": "main", "image": "repo/asr:2"}),
        )
    )
    assert done.phase == Phase.ROLLED_BACK, done.status_message
    assert "ProgressDeadlineExceeded" in done.status_message
    # The failed step put its own change back; the completed one was undone by the controller.
    assert _image(kube, "asr") == "repo/asr:1"
    assert _image(kube, "llm") == "repo/llm:1"
    llm = _deployment(kube, "llm")
    assert "env" not in llm["spec"]["template"]["spec"]["containers"][0]
    assert [r.rollback_outcome for r in done.steps[0].node_results] == ["SUCCEEDED"]
    assert done.steps[1].node_results[0].state == StepState.FAILED
    assert "put back what it changed" in done.steps[1].node_results[0].message
    _ready(kube, "llm", 3)


async def test_a_conflicting_write_is_read_again_and_retried(rig: Rig, kube: KubeApiServer) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1, image="repo/llm:1"))
    kube.cluster.conflict_next("Deployment", NAMESPACE, "llm", times=2)
    done = await rig.run(
        plan(("rollout", [workload("llm")], {"container": "main", "image": "repo/llm:2"}))
    )
    assert done.phase == Phase.COMPLETED, done.status_message
    assert _image(kube, "llm") == "repo/llm:2"
    codes = [r.code for r in _writes(kube, "deployments")]
    assert codes[:2] == [409, 409]
    assert codes[-1] == 200  # (a status update in between may add a real 409 before it)


async def test_restart_stamps_the_pod_template_as_kubectl_does(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2))
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    done = await rig.run(plan(("restart", [workload("llm")], {})))
    assert done.phase == Phase.COMPLETED, done.status_message
    template = _deployment(kube, "llm")["spec"]["template"]["metadata"]
    stamp = dt.datetime.fromisoformat(template["annotations"]["kubectl.kubernetes.io/restartedAt"])
    assert stamp >= before


async def test_a_run_repeated_after_a_restart_keeps_the_state_recorded_before_the_first(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1, image="repo/llm:1"))
    run = StepRun(
        plan_id="plan-resume",
        step_index=0,
        action="rollout",
        parameters={"container": "main", "image": "repo/llm:2"},
        target=workload("llm"),
        deadline=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30),
    )
    first = await rig.executor.run(run)
    again = await rig.executor.run(run)  # as a restarted controller would
    assert first.succeeded and again.succeeded, (first.message, again.message)
    defaulted = {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
    }
    expected = {"containers": {"main": {"image": "repo/llm:1", "env": []}}, "strategy": defaulted}
    assert first.output["previous"] == expected
    assert again.output["previous"] == expected
    # The second run wrote nothing. (A write may meet a 409 when the cluster's controller
    # updated the status in between; it is read again and retried: count what was stored.)
    assert [r.code for r in _writes(kube, "deployments") if r.code != 409] == [200]


async def test_a_drain_blocked_by_a_budget_names_it_and_uncordons_the_node(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=3))
    _ready(kube, "llm", 3)
    kube.cluster.put(
        pod_disruption_budget(
            "llm-pdb", namespace=NAMESPACE, selector={"app": "llm"}, min_available=3
        )
    )
    started = time.monotonic()
    done = await rig.run(plan(("drain", [node("gpu-0")], {}), timeout_s=3))
    assert done.phase == Phase.FAILED, done.status_message
    assert time.monotonic() - started < 20
    message = done.steps[0].node_results[0].message
    assert "PodDisruptionBudget models/llm-pdb (disruptionsAllowed 0)" in message
    assert "pod models/llm-" in message
    gpu0 = kube.cluster.get("Node", None, "gpu-0")
    assert gpu0 is not None and not gpu0["spec"].get("unschedulable", False)


async def test_a_drain_evicts_what_kubectl_would_and_a_later_failure_uncordons(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=3))
    _ready(kube, "llm", 3)
    kube.cluster.put(
        pod("dcgm-exporter", namespace=NAMESPACE, node="gpu-0", owner_kind="DaemonSet")
    )
    kube.cluster.put(pod("kube-proxy-gpu-0", namespace=NAMESPACE, node="gpu-0", mirror=True))
    kube.cluster.put(deployment("asr", namespace=NAMESPACE, replicas=1, image="repo/asr:1"))
    _ready(kube, "asr", 1)
    on_gpu0 = {
        p["metadata"]["name"]
        for p in kube.cluster.list("Pod", NAMESPACE)
        if p["spec"].get("nodeName") == "gpu-0"
    }
    workload_pods = {name for name in on_gpu0 if name.startswith(("llm-", "asr-"))}
    assert workload_pods
    done = await rig.run(
        plan(
            ("drain", [node("gpu-0")], {}),
            ("rollout", [workload("asr")], {"container": "other", "image": "repo/asr:2"}),
        )
    )
    assert done.phase == Phase.ROLLED_BACK, done.status_message
    assert "no container named 'other'" in done.status_message
    evicted = set(done.steps[0].node_results[0].output["evicted"])
    assert evicted == {f"{NAMESPACE}/{name}" for name in workload_pods}
    remaining = {
        p["metadata"]["name"]
        for p in kube.cluster.list("Pod", NAMESPACE)
        if p["spec"].get("nodeName") == "gpu-0"
    }
    assert {"dcgm-exporter", "kube-proxy-gpu-0"} <= remaining
    gpu0 = kube.cluster.get("Node", None, "gpu-0")
    assert gpu0 is not None and not gpu0["spec"].get("unschedulable", False)


async def test_a_drain_refuses_pods_with_local_storage_unless_told(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(
        pod(
            "scratch",
            namespace=NAMESPACE,
            node="gpu-1",
            owner_kind="ReplicaSet",
            empty_dir=True,
        )
    )
    refused = await rig.run(plan(("drain", [node("gpu-1")], {})))
    assert refused.phase == Phase.FAILED
    assert "models/scratch (uses local storage (emptyDir)" in refused.status_message
    assert kube.cluster.get("Pod", NAMESPACE, "scratch") is not None
    drained = await rig.run(plan(("drain", [node("gpu-1")], {"delete_emptydir_data": True})))
    assert drained.phase == Phase.COMPLETED, drained.status_message
    assert kube.cluster.get("Pod", NAMESPACE, "scratch") is None


async def test_targets_and_parameters_are_checked_at_submission(rig: Rig) -> None:
    bad = plan(
        ("scale", [workload("llm", cluster="prod")], {"replicas": -1}),
        (
            "rollout",
            [workload("llm", kind="StatefulSet")],
            {"image": "x", "strategy": "blue_green", "weights": [50]},
        ),
        ("drain", [workload("llm")], {"force": "yes"}),
    )
    with pytest.raises(PlanInvalid) as refused:
        await rig.desk.submit(bad, "planner", validate_only=False)
    assert refused.value.problems == [
        (
            "plan.steps[0].targets[0].kubernetes.cluster",
            "unknown cluster 'prod' (clusters: edge, lab)",
        ),
        ("plan.steps[0].parameters.replicas", "required, a whole number in [0, 10000]"),
        (
            "plan.steps[1].targets[0].kubernetes.kind",
            "rollout acts on Deployment, not 'StatefulSet'",
        ),
        ("plan.steps[1].parameters.container", "required: the name of the container to change"),
        ("plan.steps[1].parameters.weights", "only a canary rollout has weights"),
        (
            "plan.steps[1].parameters.service",
            "required: the Service that selects the Deployment's pods",
        ),
        ("plan.steps[2].targets[0].kubernetes.kind", "drain acts on Node, not 'Deployment'"),
        ("plan.steps[2].parameters.force", "must be true or false"),
    ]


async def test_an_unreachable_cluster_fails_its_step_in_time_and_the_other_is_rolled_back(
    rig: Rig, kube: KubeApiServer, kube_b: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    kube_b.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    kube_b.stop()
    started = time.monotonic()
    done = await rig.run(
        plan(
            ("scale", [workload("llm")], {"replicas": 2}),
            ("scale", [workload("llm", cluster="edge")], {"replicas": 2}),
            timeout_s=5,
        )
    )
    assert time.monotonic() - started < 30
    assert done.phase == Phase.ROLLED_BACK, done.status_message
    assert "cluster edge: API server unreachable" in done.status_message
    assert _deployment(kube, "llm")["spec"]["replicas"] == 1


async def test_a_missing_permission_fails_the_step_with_the_api_servers_reason(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    kube.cluster.forbid("update", "deployments")
    done = await rig.run(
        plan(("rollout", [workload("llm")], {"container": "main", "image": "repo/llm:2"}))
    )
    assert done.phase == Phase.FAILED
    assert "403 Forbidden" in done.status_message
    assert 'cannot update resource "deployments"' in done.status_message
    assert _image(kube, "llm") == "repo/model:1"


def _canary_step(
    name: str, image: str, weights: list[int]
) -> tuple[str, list[Any], dict[str, Any]]:
    return (
        "rollout",
        [workload(name)],
        {"container": "main", "image": image, "strategy": "canary", "weights": weights},
    )


async def test_a_canary_steps_through_its_weights_and_is_promoted(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=4, image="repo/llm:1"))
    _ready(kube, "llm", 4)
    done = await rig.run(plan(_canary_step("llm", "repo/llm:2", [25, 50, 100])))
    assert done.phase == Phase.COMPLETED, done.status_message
    output = done.steps[0].node_results[0].output
    assert output["stages"] == [
        "canary at 25% (1/4 replicas)",
        "canary at 50% (2/4 replicas)",
        "canary at 100% (4/4 replicas)",
    ]
    # Promoted: the stable Deployment has the new version and its replicas; no canary left.
    assert _image(kube, "llm") == "repo/llm:2"
    assert _deployment(kube, "llm")["spec"]["replicas"] == 4
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-canary") is None
    canary_scales = [
        r for r in _writes(kube, "deployments/scale") if r.name == "llm-canary" and r.code == 200
    ]
    assert len(canary_scales) == 3
    _ready(kube, "llm", 4)


async def test_a_canary_whose_analysis_is_inconclusive_is_rolled_back_and_removed(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=4, image="repo/llm:1"))
    _ready(kube, "llm", 4)
    draft = plan(_canary_step("llm", "repo/llm:2", [25, 100]))
    draft.health_gates = (HealthGate("gpu-memory", "sample.gpus.size() > 0", 5.0),)
    done = await rig.run(draft)
    assert done.phase == Phase.FAILED, done.status_message
    assert "analysis at canary at 25% (1/4 replicas)" in done.status_message
    assert "inconclusive" in done.status_message
    assert "put back what it changed" in done.status_message
    assert _image(kube, "llm") == "repo/llm:1"
    assert _deployment(kube, "llm")["spec"]["replicas"] == 4
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-canary") is None
    _ready(kube, "llm", 4)


async def test_a_canary_that_never_becomes_ready_is_rolled_back(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(
        deployment(
            "llm",
            namespace=NAMESPACE,
            replicas=2,
            image="repo/llm:1",
            progress_deadline_seconds=2,
        )
    )
    _ready(kube, "llm", 2)
    kube.cluster.mark_broken_image("repo/llm:bad")
    done = await rig.run(plan(_canary_step("llm", "repo/llm:bad", [50, 100])))
    assert done.phase == Phase.FAILED, done.status_message
    assert "Deployment models/llm-canary: ProgressDeadlineExceeded" in done.status_message
    assert _image(kube, "llm") == "repo/llm:1"
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-canary") is None
    _ready(kube, "llm", 2)


async def test_a_cancel_mid_canary_stops_it_at_the_next_stage_and_rolls_back(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=4, image="repo/llm:1"))
    _ready(kube, "llm", 4)
    submitted = await rig.desk.submit(
        plan(_canary_step("llm", "repo/llm:2", [25, 50, 75, 100])), "operator", validate_only=False
    )
    canary_seen = await asyncio.to_thread(
        kube.cluster.wait_for,
        lambda: kube.cluster.get("Deployment", NAMESPACE, "llm-canary"),
        20,
    )
    assert canary_seen is not None
    await rig.desk.cancel(submitted.plan.plan_id, "operator", "wrong model")
    done = await rig.terminal(submitted.plan.plan_id)
    assert done.phase in (Phase.FAILED, Phase.ROLLED_BACK), done.status_message
    assert "wrong model" in done.status_message
    assert _image(kube, "llm") == "repo/llm:1"
    assert _deployment(kube, "llm")["spec"]["replicas"] == 4
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-canary") is None


def _service_selector(kube: KubeApiServer, name: str) -> dict[str, str]:
    found = kube.cluster.get("Service", NAMESPACE, name)
    assert found is not None
    return dict(found["spec"]["selector"])


def _blue_green_step(image: str, delay_s: float = 0.5) -> tuple[str, list[Any], dict[str, Any]]:
    return (
        "rollout",
        [workload("llm")],
        {
            "container": "main",
            "image": image,
            "strategy": "blue_green",
            "service": "llm",
            "scale_down_delay_s": delay_s,
        },
    )


async def test_blue_green_checks_green_switches_the_service_and_folds_back(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    kube.cluster.put(service("llm", namespace=NAMESPACE, selector={"app": "llm"}))
    _ready(kube, "llm", 2)
    selectors: list[dict[str, str]] = []
    submitted = await rig.desk.submit(
        plan(_blue_green_step("repo/llm:2", delay_s=1.0)), "planner", validate_only=False
    )

    def switched() -> bool:
        selector = _service_selector(kube, "llm")
        if not selectors or selectors[-1] != selector:
            selectors.append(selector)
        return selector.get("sentinel.io/track") == "green"

    await asyncio.to_thread(kube.cluster.wait_for, switched, 30)
    green = kube.cluster.get("Deployment", NAMESPACE, "llm-green")
    assert green is not None and green["status"]["availableReplicas"] == 2
    assert _image(kube, "llm") == "repo/llm:1"  # blue untouched while green serves
    done = await rig.terminal(submitted.plan.plan_id)
    assert done.phase == Phase.COMPLETED, done.status_message
    # Pinned to blue's pods while green started, then green, then the Service's own again.
    pinned = next(i for i, s in enumerate(selectors) if "pod-template-hash" in s)
    assert set(selectors[pinned]) == {"app", "pod-template-hash"}
    assert selectors[-1] == {"app": "llm", "sentinel.io/track": "green"}
    assert pinned < len(selectors) - 1
    assert _service_selector(kube, "llm") == {"app": "llm"}
    assert _image(kube, "llm") == "repo/llm:2"
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-green") is None
    assert done.steps[0].node_results[0].output["stages"] == [
        "green ready, before the switch",
        "after the switch to green",
    ]


async def test_blue_green_failing_analysis_switches_back_and_removes_green(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    kube.cluster.put(service("llm", namespace=NAMESPACE, selector={"app": "llm"}))
    _ready(kube, "llm", 2)
    draft = plan(_blue_green_step("repo/llm:2"))
    draft.health_gates = (HealthGate("latency", "sample.host.load1 < 100.0", 5.0),)
    done = await rig.run(draft)
    assert done.phase == Phase.FAILED, done.status_message
    assert "analysis green ready, before the switch" in done.status_message
    assert _service_selector(kube, "llm") == {"app": "llm"}
    assert _image(kube, "llm") == "repo/llm:1"
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-green") is None


async def test_a_validate_only_submission_dry_runs_every_write_and_changes_nothing(
    rig: Rig, kube: KubeApiServer
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    _ready(kube, "llm", 2)
    kube.cluster.put(
        pod("dcgm-exporter", namespace=NAMESPACE, node="gpu-1", owner_kind="DaemonSet")
    )

    def versions() -> tuple[str, str]:
        gpu1 = kube.cluster.get("Node", None, "gpu-1")
        assert gpu1 is not None
        return (
            _deployment(kube, "llm")["metadata"]["resourceVersion"],
            gpu1["metadata"]["resourceVersion"],
        )

    before = versions()
    kube.cluster.clear_requests()
    submission = await rig.desk.submit(
        plan(
            ("scale", [workload("llm")], {"replicas": 5}),
            ("rollout", [workload("llm")], {"container": "main", "image": "repo/llm:2"}),
            ("drain", [node("gpu-1")], {}),
            ("rollout", [workload("ghost")], {"container": "main", "image": "repo/x:2"}),
        ),
        "planner",
        validate_only=True,
    )
    by_step = {c.step_index: c for c in submission.preview}
    assert [(c.field, c.before, c.after) for c in by_step[0].changes] == [
        ("spec.replicas", "2", "5")
    ]
    assert [(c.field, c.before, c.after) for c in by_step[1].changes] == [
        ("containers.main.image", "repo/llm:1", "repo/llm:2")
    ]
    drained = [(c.field, c.after) for c in by_step[2].changes]
    assert drained[0] == ("spec.unschedulable", "true")
    llm_on_gpu1 = sorted(
        f"pod {NAMESPACE}/{p['metadata']['name']}"
        for p in kube.cluster.list("Pod", NAMESPACE)
        if p["spec"].get("nodeName") == "gpu-1" and p["metadata"]["name"].startswith("llm-")
    )
    assert sorted(field for field, after in drained[1:]) == llm_on_gpu1
    assert "404 NotFound" in by_step[3].dry_run_error
    # Nothing was stored: every write was a dry run and no object's version moved.
    writes = [r for r in kube.cluster.requests if r.verb not in ("get", "list", "watch")]
    assert writes and all(r.dry_run for r in writes)
    assert versions() == before
    assert _image(kube, "llm") == "repo/llm:1"


async def test_with_an_opt_in_label_only_labelled_workloads_are_changed(
    clusters: KubeClusters, kube: KubeApiServer
) -> None:
    executor = KubernetesExecutor(clusters, opt_in_label="sentinel.io/managed=true")
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    kube.cluster.put(
        deployment(
            "asr",
            namespace=NAMESPACE,
            replicas=1,
            labels={"app": "asr", "sentinel.io/managed": "true"},
        )
    )

    def scale(name: str) -> StepRun:
        return StepRun(
            plan_id="plan-opt-in",
            step_index=0,
            action="scale",
            parameters={"replicas": 2},
            target=workload(name),
            deadline=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20),
        )

    refused = await executor.run(scale("llm"))
    assert not refused.succeeded
    assert "does not carry the opt-in label sentinel.io/managed=true" in refused.message
    assert _deployment(kube, "llm")["spec"]["replicas"] == 1
    allowed = await executor.run(scale("asr"))
    assert allowed.succeeded, allowed.message
    assert _deployment(kube, "asr")["spec"]["replicas"] == 2
