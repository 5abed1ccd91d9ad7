"""Analysis gates on Kubernetes rollouts, against a real Prometheus (Debian's package, started
by tests/analysis/conftest.py on loopback and scraping an exporter the test sets) and the
Kubernetes API test server: a canary goes on only while its Prometheus gate passes; a gate
without data is inconclusive and rolls the canary back; every measurement (resolved query, raw
value, condition, verdict) is kept with the plan and shown by GetPlan."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.analysis import PrometheusGate
from controlplane.api._plan_service import plan_to_proto
from controlplane.executors import Target
from controlplane.plans import HealthGate, Phase
from tests.analysis.conftest import RunningPrometheus, prometheus  # noqa: F401 (fixture)
from tests.executors.conftest import NAMESPACE, Rig, plan, workload
from tests.kubeapi import KubeApiServer
from tests.kubeapi.objects import deployment

pytestmark = pytest.mark.timeout(90)


def _gate(running: RunningPrometheus, query: str, condition: str) -> HealthGate:
    return HealthGate(
        "errors",
        "",
        30.0,
        PrometheusGate(
            name="errors",
            address=running.address,
            query=query,
            success_condition=condition,
            interval_s=0.0,
            count=1,
            timeout_s=5.0,
        ),
    )


def _canary(weights: list[int]) -> tuple[str, list[Target], dict[str, Any]]:
    return (
        "rollout",
        [workload("llm")],
        {"container": "main", "image": "repo/llm:2", "strategy": "canary", "weights": weights},
    )


async def test_a_canary_whose_prometheus_gate_passes_is_promoted_with_its_measurements_kept(
    rig: Rig,
    kube: KubeApiServer,
    prometheus: RunningPrometheus,  # noqa: F811
) -> None:
    prometheus.deployment_errors.labels(NAMESPACE, "llm", "lab", "any").set(0)
    await prometheus.wait_until_seen(
        f'gate_deployment_errors{{namespace="{NAMESPACE}",name="llm"}}', 0.0
    )
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    draft = plan(_canary([50, 100]))
    draft.health_gates = (
        _gate(
            prometheus,
            'max(gate_deployment_errors{namespace="{{namespace}}",name="{{name}}"})',
            "result[0] < 1.0",
        ),
    )
    done = await rig.run(draft)
    assert done.phase == Phase.COMPLETED, done.status_message
    points = [(m.point, m.verdict) for m in done.measurements]
    assert points == [
        ("canary at 50% (1/2 replicas)", "PASSED"),
        ("canary at 100% (2/2 replicas)", "PASSED"),
        ("after wave 0", "PASSED"),
    ]
    first = done.measurements[0]
    assert first.query == f'max(gate_deployment_errors{{namespace="{NAMESPACE}",name="llm"}})'
    assert first.value == [0.0]
    assert first.condition == "result[0] < 1.0"
    assert first.target == f"k8s/lab/{NAMESPACE}/Deployment/llm"
    # As GetPlan and WatchPlan show it.
    shown = plan_to_proto(done).measurements[0]
    assert (shown.gate, shown.verdict, shown.query) == ("errors", "PASSED", first.query)
    assert [v.number_value for v in shown.value.list_value.values] == [0.0]
    assert shown.end_time.ToDatetime() >= shown.start_time.ToDatetime()


async def test_a_canary_whose_gate_sees_no_data_is_inconclusive_and_rolled_back(
    rig: Rig,
    kube: KubeApiServer,
    prometheus: RunningPrometheus,  # noqa: F811
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    draft = plan(_canary([50, 100]))
    draft.health_gates = (
        _gate(prometheus, 'gate_test_value{case="never-set"}', "result[0] < 1.0"),
    )
    done = await rig.run(draft)
    assert done.phase == Phase.FAILED, done.status_message
    assert "analysis gate 'errors' inconclusive" in done.status_message
    assert [(m.point, m.verdict, m.value) for m in done.measurements] == [
        ("canary at 50% (1/2 replicas)", "INCONCLUSIVE", [])
    ]
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == "repo/llm:1"
    assert stored["spec"]["replicas"] == 2
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-canary") is None


async def test_a_failing_gate_after_a_wave_rolls_the_plan_back(
    rig: Rig,
    kube: KubeApiServer,
    prometheus: RunningPrometheus,  # noqa: F811
) -> None:
    await prometheus.set_value("wave-fails", 7.0)
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=1))
    draft = plan(("scale", [workload("llm")], {"replicas": 3}))
    draft.health_gates = (
        _gate(prometheus, 'gate_test_value{case="wave-fails"}', "result[0] < 5.0"),
    )
    done = await rig.run(draft)
    assert done.phase == Phase.ROLLED_BACK, done.status_message
    assert "analysis gate 'errors' failed" in done.status_message
    [measurement] = done.measurements
    assert (measurement.point, measurement.value, measurement.verdict) == (
        "after wave 0",
        [7.0],
        "FAILED",
    )
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None and stored["spec"]["replicas"] == 1
