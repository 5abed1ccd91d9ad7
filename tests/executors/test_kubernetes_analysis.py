"""Analysis gates on Kubernetes rollouts, against a real Prometheus (Debian's package, started
by tests/analysis/conftest.py on loopback and scraping an exporter the test sets) and the
Kubernetes API test server: a canary goes on only while its Prometheus gate passes; a gate
without data is inconclusive and rolls the canary back; every measurement (resolved query, raw
value, condition, verdict) is kept with the plan and shown by GetPlan."""

from __future__ import annotations

import asyncio
import dataclasses
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


def _pausing(running: RunningPrometheus, case: str, timeout_s: float) -> HealthGate:
    gate = _gate(running, f'gate_test_value{{case="{case}"}}', "result[0] < 1.0")
    return dataclasses.replace(gate, pause_on_inconclusive=True, pause_timeout_s=timeout_s)


async def _phase_becomes(rig: Rig, plan_id: str, phase: Phase) -> None:
    async def follow() -> None:
        async for current, _ in rig.desk.watch(plan_id):
            if current.phase == phase:
                return

    await asyncio.wait_for(follow(), 30)


async def test_an_inconclusive_gate_that_pauses_waits_for_an_operator_who_lets_it_go_on(
    rig: Rig,
    kube: KubeApiServer,
    prometheus: RunningPrometheus,  # noqa: F811
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    draft = plan(_canary([50, 100]))
    draft.health_gates = (_pausing(prometheus, "pause-approved", 600),)
    submitted = await rig.desk.submit(draft, "planner", validate_only=False)
    plan_id = submitted.plan.plan_id
    await _phase_becomes(rig, plan_id, Phase.PAUSED)
    paused = await rig.desk.get(plan_id)
    assert "paused for an operator: analysis gate 'errors' inconclusive" in paused.status_message
    canary = kube.cluster.get("Deployment", NAMESPACE, "llm-canary")
    assert canary is not None and canary["spec"]["replicas"] == 1  # held at the first stage
    # The operator finds the missing metric fixed and lets it go on; later stages measure it.
    await prometheus.set_value("pause-approved", 0.5)
    await rig.desk.approve(plan_id, "operator-b", "looked at it")
    done = await rig.terminal(plan_id)
    assert done.phase == Phase.COMPLETED, done.status_message
    phases = [(t.from_phase, t.to_phase) for t in done.transitions]
    assert (Phase.EXECUTING, Phase.PAUSED) in phases
    assert (Phase.PAUSED, Phase.EXECUTING) in phases
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == "repo/llm:2"


async def test_a_paused_plan_rolls_back_when_cancelled_or_when_the_pause_times_out(
    rig: Rig,
    kube: KubeApiServer,
    prometheus: RunningPrometheus,  # noqa: F811
) -> None:
    kube.cluster.put(deployment("llm", namespace=NAMESPACE, replicas=2, image="repo/llm:1"))
    draft = plan(_canary([50, 100]))
    draft.health_gates = (_pausing(prometheus, "pause-cancelled", 600),)
    submitted = await rig.desk.submit(draft, "planner", validate_only=False)
    await _phase_becomes(rig, submitted.plan.plan_id, Phase.PAUSED)
    await rig.desk.cancel(submitted.plan.plan_id, "operator-b", "not today")
    cancelled = await rig.terminal(submitted.plan.plan_id)
    assert cancelled.phase == Phase.FAILED, cancelled.status_message
    assert "cancelled by operator-b: not today" in cancelled.status_message
    assert [(t.from_phase, t.to_phase, t.reason) for t in cancelled.transitions][-2] == (
        Phase.PAUSED,
        Phase.EXECUTING,
        "pause ended: cancelled by operator-b: not today",
    )

    timed = plan(_canary([50, 100]))
    timed.health_gates = (_pausing(prometheus, "pause-timeout", 1.0),)
    done = await rig.run(timed)
    assert done.phase == Phase.FAILED, done.status_message
    assert "pause timed out after 1 s without an operator" in done.status_message
    stored = kube.cluster.get("Deployment", NAMESPACE, "llm")
    assert stored is not None
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == "repo/llm:1"
    assert kube.cluster.get("Deployment", NAMESPACE, "llm-canary") is None
