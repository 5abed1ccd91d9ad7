"""A gate's definition checked at submission (every problem with its field path), placeholder
resolution, and the judgement of one result, all without a Prometheus."""

from __future__ import annotations

import dataclasses
import math

import pytest

from controlplane.analysis import (
    GateInvalid,
    GateVerdict,
    MeasurementVerdict,
    PrometheusGate,
    check_gate,
    judge,
    resolve_query,
    run_gate,
)

GOOD = PrometheusGate(
    name="checkout-error-rate",
    address="https://prometheus.monitoring:9090/prom/",
    query=(
        'sum(rate(http_requests_total{namespace="{{namespace}}", app="{{name}}", code=~"5.."}[5m]))'
        ' / sum(rate(http_requests_total{namespace="{{namespace}}", app="{{name}}"}[5m]))'
    ),
    success_condition="result[0] < 0.05",
    failure_condition="result[0] > 0.1",
    interval_s=60.0,
    count=5,
    failure_limit=1,
    inconclusive_limit=1,
)

VARIABLES = {"namespace": "shop", "name": "checkout", "cluster": "eu-1", "plan_id": "plan-7"}


def paths(gate: PrometheusGate) -> dict[str, str]:
    problems = check_gate(gate)
    found = dict(problems)
    assert len(found) == len(problems), f"one problem per field expected: {problems}"
    return found


def test_a_well_formed_gate_has_no_problems() -> None:
    assert check_gate(GOOD) == []
    assert check_gate(dataclasses.replace(GOOD, failure_condition="")) == []


def test_every_bad_field_is_reported_with_its_path() -> None:
    gate = PrometheusGate(
        name="",
        address="ftp://prometheus:9090",
        query="",
        success_condition="",
        failure_condition="result >",
        interval_s=-1.0,
        count=0,
        failure_limit=-1,
        inconclusive_limit=-1,
        consecutive_error_limit=-1,
        timeout_s=0.0,
    )

    assert set(paths(gate)) == {
        "name",
        "address",
        "query",
        "success_condition",
        "failure_condition",
        "interval",
        "count",
        "failure_limit",
        "inconclusive_limit",
        "consecutive_error_limit",
        "timeout",
    }


def test_query_that_is_not_promql_is_refused_with_the_parser_message() -> None:
    problems = paths(dataclasses.replace(GOOD, query='sum(rate(x{job="a"}[5m])'))

    assert problems == {"query": "not valid PromQL: unclosed left parenthesis"}


def test_query_with_an_unknown_placeholder_is_refused() -> None:
    problems = paths(dataclasses.replace(GOOD, query='up{pod="{{pod}}"}'))

    assert problems["query"].startswith("unknown placeholder(s) {{pod}}; queries may use")


def test_range_vector_query_is_refused_with_a_hint() -> None:
    problems = paths(dataclasses.replace(GOOD, query='(http_requests_total{app="{{name}}"}[5m])'))

    assert "use an instant query" in problems["query"]


@pytest.mark.parametrize(
    ("query", "why"),
    [
        # Within the length limit, yet promql-parser 0.12 would take seconds over the first
        # and crash the process (not raise) on the other two: refused before it sees them.
        ("(" * 4990 + "x" + ")" * 4990, "nested more than 64 brackets deep"),
        ("-" * 9000 + "x", "has more than 200 operators"),
        ("x" + "^x" * 4500, "has more than 200 operators"),
        ("up" + " and up" * 1400, "has more than 200 operators"),
    ],
)
def test_query_too_deep_for_the_parser_is_refused_before_parsing(query: str, why: str) -> None:
    assert paths(dataclasses.replace(GOOD, query=query)) == {"query": why}


def test_brackets_and_operators_inside_strings_and_comments_do_not_count() -> None:
    query = 'up{job=~"' + "(a|b)+" * 100 + '"} # ' + "(((---" * 100 + "\n + 1"

    assert check_gate(dataclasses.replace(GOOD, query=query)) == []


def test_conditions_may_use_only_result() -> None:
    problems = paths(
        dataclasses.replace(GOOD, success_condition="value < 1.0", failure_condition="result >")
    )

    assert problems["success_condition"].startswith("unknown variable(s) value;")
    assert "line 1" in problems["failure_condition"]


def test_limits_above_count_and_repeats_without_a_pause_are_refused() -> None:
    problems = paths(
        dataclasses.replace(GOOD, count=2, failure_limit=3, inconclusive_limit=3, interval_s=0.0)
    )

    assert problems == {
        "failure_limit": "must not exceed count (2)",
        "inconclusive_limit": "must not exceed count (2)",
        "interval": "must be more than 0 seconds when count is more than 1",
    }


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("http://user:secret@prometheus:9090", "must not carry credentials"),
        ("prometheus:9090", "must start with http:// or https://"),
        ("http://prometheus:9090/?x=1", "must be a base URL"),
        ("http://prometheus:99999", "not a URL"),
    ],
)
def test_address_must_be_a_plain_http_base_url(address: str, why: str) -> None:
    assert why in paths(dataclasses.replace(GOOD, address=address))["address"]


def test_placeholders_are_replaced_in_the_resolved_query() -> None:
    assert resolve_query('up{ns="{{namespace}}", p="{{ plan_id }}"}', VARIABLES) == (
        'up{ns="shop", p="plan-7"}'
    )


@pytest.mark.parametrize(
    ("variables", "why"),
    [
        ({"name": "checkout"}, "no value for placeholder {{namespace}}"),
        ({"namespace": 'shop"} or vector(1) #'}, "has characters that could change the query"),
    ],
)
def test_resolving_refuses_missing_and_unsafe_values(variables: dict[str, str], why: str) -> None:
    with pytest.raises(ValueError) as refused:
        resolve_query('up{namespace="{{namespace}}"}', variables)

    assert why in str(refused.value)


async def test_unresolvable_query_makes_the_gate_inconclusive_without_asking_prometheus() -> None:
    # Nothing listens on port 9 of loopback: a query sent there would be an error of its own.
    gate = dataclasses.replace(GOOD, address="http://127.0.0.1:9")

    outcome = await run_gate(gate, {"name": "checkout"})

    assert outcome.verdict is GateVerdict.INCONCLUSIVE
    [only] = outcome.measurements
    assert only.verdict is MeasurementVerdict.ERROR
    assert only.query == GOOD.query
    assert only.message == "no value for placeholder {{namespace}}"
    assert outcome.reason.endswith("nothing was asked of Prometheus")


async def test_run_parameters_out_of_range_are_refused_before_measuring() -> None:
    with pytest.raises(GateInvalid) as refused:
        await run_gate(dataclasses.replace(GOOD, count=0), VARIABLES)

    assert refused.value.problems == [("count", "must be within [1, 1000]")]


@pytest.mark.parametrize(
    ("success", "failure", "value", "verdict"),
    [
        # Argo Rollouts' rules for one measurement.
        ("result[0] < 0.05", "", (0.01,), MeasurementVerdict.PASSED),
        ("result[0] < 0.05", "", (0.2,), MeasurementVerdict.FAILED),
        ("result[0] < 0.05", "result[0] > 0.1", (0.07,), MeasurementVerdict.INCONCLUSIVE),
        ("result[0] < 1.0", "result[0] > 0.0", (0.5,), MeasurementVerdict.FAILED),
        ("result[0] < 1.0", "result[0] > 2.0", (0.5,), MeasurementVerdict.PASSED),
        ("result[0]", "", (0.5,), MeasurementVerdict.ERROR),
        ("result[1] < 1.0", "", (0.5,), MeasurementVerdict.ERROR),
        ("result < 1.0", "", math.inf, MeasurementVerdict.FAILED),
        ("size(result) == 2", "", (1.0, 2.0), MeasurementVerdict.PASSED),
        # Ours: no data and NaN are not evidence either way.
        ("size(result) == 0", "", (), MeasurementVerdict.INCONCLUSIVE),
        ("true", "", (1.0, math.nan), MeasurementVerdict.INCONCLUSIVE),
    ],
)
def test_one_result_is_judged_by_argo_rules(
    success: str, failure: str, value: float | tuple[float, ...], verdict: MeasurementVerdict
) -> None:
    gate = dataclasses.replace(GOOD, success_condition=success, failure_condition=failure)

    assert judge(gate, value)[0] is verdict
