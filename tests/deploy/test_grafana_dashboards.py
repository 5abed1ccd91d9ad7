"""deploy/grafana/*.json as Grafana imports them: plain dashboards that pick their Prometheus data
source from a variable, whose every query parses as PromQL and selects only metrics a live
control plane or agent exports, or series the rule file records."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import Pki
from tests.deploy._metrics_scrape import (
    REPO,
    RULES_FILE,
    ExportedMetrics,
    exported_metrics,
    selected_metrics,
)

DASHBOARDS = {path.name: path for path in sorted((REPO / "deploy" / "grafana").glob("*.json"))}
EXPECTED = {"fleet-gpu-health.json", "control-plane.json", "plans.json"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Grafana's own variables, replaced by a value of the kind Grafana puts there.
_BUILTIN_DURATIONS = {"__rate_interval", "__interval", "__range"}
_BUILTIN_NUMBERS = {"__interval_ms", "__range_s", "__range_ms"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.+),\s*(\w+)\s*\)\s*$")


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARDS[name].read_text())
    return document


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _substitute(expression: str, defined: set[str]) -> str:
    """The expression as Prometheus receives it: template variables replaced by values of
    their kind; an undefined variable is an error, as Grafana would send it literally."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name in _BUILTIN_DURATIONS:
            return "5m"
        if name in _BUILTIN_NUMBERS:
            return "300"
        if name in defined:
            return "placeholder"
        raise AssertionError(f"undefined variable ${name} in {expression!r}")

    return _VARIABLE.sub(value, expression)


def _recorded() -> frozenset[str]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return frozenset(
        rule["record"]
        for group in document["groups"]
        for rule in group["rules"]
        if "record" in rule
    )


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable's metric."""
    defined = set(_variables(dashboard))
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield (
                f"panel {panel['title']!r} target {target['refId']}",
                _substitute(target["expr"], defined),
            )
    for variable in _variables(dashboard).values():
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not label_values(metric, label)"
            yield f"variable {variable['name']}", _substitute(match.group(1), defined)


@pytest.fixture(scope="module")
def exported(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> ExportedMetrics:
    pki.client("agent", "scrape-node")
    return exported_metrics(pki.directory, tmp_path_factory.mktemp("scrape"))


def test_the_three_dashboards_exist_with_distinct_uids() -> None:
    assert set(DASHBOARDS) == EXPECTED
    uids = [_load(name)["uid"] for name in sorted(DASHBOARDS)]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dashboard_picks_its_prometheus_from_a_datasource_variable(name: str) -> None:
    dashboard = _load(name)
    variables = _variables(dashboard)

    assert 36 <= dashboard["schemaVersion"] <= 41
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"node", "instance"} & set(variables), "no node or instance variable"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_query_parses_as_promql(name: str) -> None:
    problems = []
    for where, expression in _queries(_load(name)):
        try:
            selected_metrics(expression)
        except ValueError as error:
            problems.append(f"{where}: {error}")

    assert problems == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_query_selects_only_exported_or_recorded_metrics(
    name: str, exported: ExportedMetrics
) -> None:
    defined = exported.all | _recorded()
    unknown = {}
    for where, expression in _queries(_load(name)):
        missing = selected_metrics(expression) - defined
        if missing:
            unknown[where] = sorted(missing)

    assert unknown == {}


def test_the_gpu_dashboard_reads_the_agents_gpu_metrics(exported: ExportedMetrics) -> None:
    used = set().union(*(selected_metrics(q) for _, q in _queries(_load("fleet-gpu-health.json"))))

    for metric in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_XID_ERRORS",
    ):
        assert metric in used
        assert metric in exported.agent


def test_an_undefined_variable_or_a_misspelt_metric_is_caught(exported: ExportedMetrics) -> None:
    with pytest.raises(AssertionError, match=r"undefined variable \$nodes"):
        _substitute('DCGM_FI_DEV_GPU_UTIL{Hostname=~"$nodes"}', {"node"})
    with pytest.raises(ValueError):
        selected_metrics(_substitute("rate(x[$__rate_interval]", set()))
    assert selected_metrics("DCGM_FI_DEV_GPU_UTILS") - exported.all == {"DCGM_FI_DEV_GPU_UTILS"}
