"""Prometheus gates measured against a real Prometheus scraping an exporter the tests control:
verdicts of single measurements, the limits that end a run, and what is recorded."""

from __future__ import annotations

import asyncio
import math

from controlplane.analysis import (
    GateVerdict,
    Measurement,
    MeasurementVerdict,
    PrometheusGate,
    measure,
    run_gate,
)
from tests.analysis.conftest import RunningPrometheus

VARIABLES = {"namespace": "shop", "name": "checkout", "cluster": "eu-1", "plan_id": "plan-7"}


class RecordedSleep:
    """Stands in for asyncio.sleep: remembers each pause and runs a step of the test's script
    (e.g. changing what Prometheus will answer next) instead of waiting."""

    def __init__(self, *steps: object) -> None:
        self.pauses: list[float] = []
        self._steps = list(steps)

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        if self._steps:
            step = self._steps.pop(0)
            if asyncio.iscoroutine(step):
                await step


async def test_gate_passes_when_every_measurement_meets_the_success_condition(
    prometheus: RunningPrometheus,
) -> None:
    await prometheus.set_value("passing", 0.01)
    gate = prometheus.gate(
        query='gate_test_value{case="passing"}',
        success_condition="result[0] < 0.05",
        count=3,
        interval_s=0.05,
    )

    outcome = await run_gate(gate, VARIABLES)

    assert outcome.verdict is GateVerdict.PASSED
    assert "all 3 measurements taken: 3 passed" in outcome.reason
    assert [m.verdict for m in outcome.measurements] == [MeasurementVerdict.PASSED] * 3
    first = outcome.measurements[0]
    assert first.gate == "error-rate"
    assert first.value == (0.01,)
    assert first.condition == "result[0] < 0.05"
    assert first.started_at <= first.finished_at <= outcome.measurements[1].started_at


async def test_second_failure_fails_a_gate_with_failure_limit_one(
    prometheus: RunningPrometheus,
) -> None:
    await prometheus.set_value("failing", 0.2)
    gate = prometheus.gate(
        query='gate_test_value{case="failing"}',
        success_condition="result[0] < 0.05",
        count=5,
        interval_s=30.0,
        failure_limit=1,
    )
    sleep = RecordedSleep()

    outcome = await run_gate(gate, VARIABLES, sleep=sleep)

    assert outcome.verdict is GateVerdict.FAILED
    assert len(outcome.measurements) == 2
    assert [m.verdict for m in outcome.measurements] == [MeasurementVerdict.FAILED] * 2
    assert "2 of 2 measurements failed, more than failure_limit (1)" in outcome.reason
    assert "result [0.2]: success_condition `result[0] < 0.05` does not hold" in outcome.reason
    assert sleep.pauses == [30.0]


async def test_failures_within_failure_limit_still_pass(prometheus: RunningPrometheus) -> None:
    await prometheus.set_value("recovering", 0.2)
    gate = prometheus.gate(
        query='gate_test_value{case="recovering"}',
        success_condition="result[0] < 0.05",
        count=3,
        interval_s=1.0,
        failure_limit=1,
    )
    sleep = RecordedSleep(prometheus.set_value("recovering", 0.01))

    outcome = await run_gate(gate, VARIABLES, sleep=sleep)

    assert outcome.verdict is GateVerdict.PASSED
    assert [m.verdict for m in outcome.measurements] == [
        MeasurementVerdict.FAILED,
        MeasurementVerdict.PASSED,
        MeasurementVerdict.PASSED,
    ]
    assert "1 failed (failure_limit 1)" in outcome.reason


async def test_failure_condition_wins_and_neither_condition_is_inconclusive(
    prometheus: RunningPrometheus,
) -> None:
    await prometheus.set_value("between", 0.07)
    between = prometheus.gate(
        query='gate_test_value{case="between"}',
        success_condition="result[0] < 0.05",
        failure_condition="result[0] > 0.1",
    )
    both_hold = prometheus.gate(
        query='gate_test_value{case="between"}',
        success_condition="result[0] < 1.0",
        failure_condition="result[0] > 0.0",
    )

    undecided = await measure(between, VARIABLES)
    decided = await measure(both_hold, VARIABLES)

    assert undecided.verdict is MeasurementVerdict.INCONCLUSIVE
    assert "neither success_condition" in undecided.message
    assert undecided.condition == "success: result[0] < 0.05; failure: result[0] > 0.1"
    assert decided.verdict is MeasurementVerdict.FAILED
    assert "failure_condition `result[0] > 0.0` holds" in decided.message


async def test_empty_result_is_inconclusive(prometheus: RunningPrometheus) -> None:
    gate = prometheus.gate(
        query='gate_test_value{case="no-such-case"}',
        success_condition="result[0] < 0.05",
        count=3,
        interval_s=1.0,
    )

    outcome = await run_gate(gate, VARIABLES, sleep=RecordedSleep())

    assert outcome.verdict is GateVerdict.INCONCLUSIVE
    [only] = outcome.measurements
    assert only.verdict is MeasurementVerdict.INCONCLUSIVE
    assert only.value == ()
    assert only.condition == ""
    assert "no series" in only.message
    assert "1 of 1 measurements were inconclusive, more than inconclusive_limit (0)" in (
        outcome.reason
    )


async def test_prometheus_query_errors_make_the_gate_inconclusive_after_the_error_limit(
    prometheus: RunningPrometheus,
) -> None:
    # The checker would refuse this query; the gate must still cope when it reaches Prometheus.
    gate = prometheus.gate(
        query="sum(rate(gate_test_value[1m])",
        success_condition="result[0] < 0.05",
        count=2,
        interval_s=30.0,
        consecutive_error_limit=2,
    )
    sleep = RecordedSleep()

    outcome = await run_gate(gate, VARIABLES, sleep=sleep)

    assert outcome.verdict is GateVerdict.INCONCLUSIVE
    assert [m.verdict for m in outcome.measurements] == [MeasurementVerdict.ERROR] * 3
    message = outcome.measurements[0].message
    assert message.startswith("Prometheus refused the query (bad_data):")
    assert "parse error" in message
    assert outcome.measurements[0].value is None
    assert "3 measurements in a row could not be taken" in outcome.reason
    assert "consecutive_error_limit (2)" in outcome.reason
    # Errors are retried after at most 10 s, whatever the interval (Argo Rollouts' retry).
    assert sleep.pauses == [10.0, 10.0]


async def test_range_vector_answer_is_an_error_that_asks_for_an_instant_query(
    prometheus: RunningPrometheus,
) -> None:
    await prometheus.set_value("ranged", 1.0)
    gate = prometheus.gate(query='gate_test_value{case="ranged"}[10s]', success_condition="true")

    measurement = await measure(gate, VARIABLES)

    assert measurement.verdict is MeasurementVerdict.ERROR
    assert "use an instant query" in measurement.message


async def test_scalar_result_is_judged_as_one_number(prometheus: RunningPrometheus) -> None:
    await prometheus.set_value("scalar", 3.0)
    gate = prometheus.gate(
        query='scalar(sum(gate_test_value{case="scalar"}))', success_condition="result >= 3"
    )

    measurement = await measure(gate, VARIABLES)

    assert measurement.verdict is MeasurementVerdict.PASSED
    assert measurement.value == 3.0


async def test_nan_result_is_inconclusive(prometheus: RunningPrometheus) -> None:
    gate = prometheus.gate(query="0 / 0", success_condition="result < 1.0")

    measurement = await measure(gate, VARIABLES)

    assert measurement.verdict is MeasurementVerdict.INCONCLUSIVE
    assert isinstance(measurement.value, float) and math.isnan(measurement.value)
    assert "NaN" in measurement.message


async def test_infinite_result_is_handed_to_the_conditions(prometheus: RunningPrometheus) -> None:
    gate = prometheus.gate(query="1 / 0", success_condition="result < 1.0")

    measurement = await measure(gate, VARIABLES)

    assert measurement.verdict is MeasurementVerdict.FAILED
    assert measurement.value == math.inf


async def test_resolved_query_is_recorded_and_measured(prometheus: RunningPrometheus) -> None:
    prometheus.deployment_errors.labels(**VARIABLES).set(2)
    resolved = (
        'gate_deployment_errors{namespace="shop", name="checkout", cluster="eu-1", '
        'plan_id="plan-7"}'
    )
    await prometheus.wait_until_seen(resolved, 2)
    gate = prometheus.gate(
        query=(
            'gate_deployment_errors{namespace="{{namespace}}", name="{{ name }}", '
            'cluster="{{cluster}}", plan_id="{{plan_id}}"}'
        ),
        success_condition="result.all(x, x < 5.0)",
    )

    measurement = await measure(gate, VARIABLES)

    assert measurement.query == resolved
    assert measurement.value == (2.0,)
    assert measurement.verdict is MeasurementVerdict.PASSED


async def test_each_measurement_is_handed_to_the_caller_as_it_is_taken(
    prometheus: RunningPrometheus,
) -> None:
    await prometheus.set_value("audited", 0.0)
    gate = prometheus.gate(
        query='gate_test_value{case="audited"}',
        success_condition="result[0] == 0.0",
        count=2,
        interval_s=1.0,
    )
    stored: list[Measurement] = []
    sleep = RecordedSleep()

    async def store(measurement: Measurement) -> None:
        # The second measurement is taken only after the first was stored.
        assert len(stored) == len(sleep.pauses)
        stored.append(measurement)

    outcome = await run_gate(gate, VARIABLES, sleep=sleep, on_measurement=store)

    assert stored == list(outcome.measurements)
    assert len(stored) == 2


async def test_prometheus_down_gives_error_measurements_with_the_network_reason(
    unused_address: str,
) -> None:
    gate = PrometheusGate(
        name="error-rate",
        address=unused_address,
        query="up",
        success_condition="result[0] == 1.0",
        interval_s=60.0,
        consecutive_error_limit=1,
        timeout_s=2.0,
    )
    sleep = RecordedSleep()

    outcome = await run_gate(gate, VARIABLES, sleep=sleep)

    assert outcome.verdict is GateVerdict.INCONCLUSIVE
    assert len(outcome.measurements) == 2
    for measurement in outcome.measurements:
        assert measurement.verdict is MeasurementVerdict.ERROR
        assert measurement.message == (
            f"cannot reach Prometheus at {unused_address}: Connection refused"
        )
    assert "consecutive_error_limit (1)" in outcome.reason
    assert "Connection refused" in outcome.reason


async def test_prometheus_that_does_not_answer_in_time_is_an_error(silent_address: str) -> None:
    gate = PrometheusGate(
        name="error-rate",
        address=silent_address,
        query="up",
        success_condition="result[0] == 1.0",
        timeout_s=0.3,
    )

    measurement = await measure(gate, VARIABLES)

    assert measurement.verdict is MeasurementVerdict.ERROR
    assert measurement.message == f"no answer from Prometheus at {silent_address} within 0.3 s"
    assert (measurement.finished_at - measurement.started_at).total_seconds() < 2
