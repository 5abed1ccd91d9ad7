"""deploy/prometheus/sentinel-rules.yaml as Prometheus loads it: the real promtool checks the
file and runs its unit tests, every alert carries what an operator needs, and every metric a rule
selects is one a live control plane or agent actually exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Pki
from tests.deploy._metrics_scrape import (
    PROMETHEUS_SERIES,
    REPO,
    RULES_FILE,
    ExportedMetrics,
    exported_metrics,
    selected_metrics,
    series_names,
)

UNIT_TESTS = sorted((REPO / "deploy" / "prometheus" / "tests").glob("*.yaml"))
ALERTS_DOC = REPO / "docs" / "alerts.md"
SEVERITIES = {"critical", "warning", "info"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian/Ubuntu: apt-get install -y prometheus)",
)


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def _recorded() -> frozenset[str]:
    return frozenset(rule["record"] for rule in _rules() if "record" in rule)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.fixture(scope="module")
def exported(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> ExportedMetrics:
    pki.client("agent", "scrape-node")
    return exported_metrics(pki.directory, tmp_path_factory.mktemp("scrape"))


@needs_promtool
def test_promtool_accepts_the_rule_file() -> None:
    result = _promtool("check", "rules", str(RULES_FILE))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_rejects_a_broken_rule_file(tmp_path: Path) -> None:
    # The check above can fail: a misspelt function is refused.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        RULES_FILE.read_text().replace("histogram_quantile(", "histogram_quantil(", 1)
    )

    result = _promtool("check", "rules", str(broken))

    assert result.returncode != 0


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    assert UNIT_TESTS, "no unit tests in deploy/prometheus/tests/"

    result = _promtool("test", "rules", *map(str, UNIT_TESTS))

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_fail_when_an_alert_changes(tmp_path: Path) -> None:
    # The unit tests can fail: the same tests against rules with one threshold moved.
    changed_rules = tmp_path / "prometheus" / "sentinel-rules.yaml"
    changed_rules.parent.mkdir()
    text = RULES_FILE.read_text()
    assert "DCGM_FI_DEV_GPU_TEMP > 85" in text
    changed_rules.write_text(text.replace("DCGM_FI_DEV_GPU_TEMP > 85", "DCGM_FI_DEV_GPU_TEMP > 95"))
    tests_dir = changed_rules.parent / "tests"
    tests_dir.mkdir()
    for unit_test in UNIT_TESTS:
        (tests_dir / unit_test.name).write_text(unit_test.read_text())

    result = _promtool("test", "rules", *map(str, sorted(tests_dir.glob("*.yaml"))))

    assert result.returncode != 0
    assert "SentinelGpuTemperatureHigh" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for unit_test in UNIT_TESTS:
        for case in yaml.safe_load(unit_test.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())

    assert not (firing | quiet) - alerts, "unit tests name alerts the rules do not define"
    assert alerts - firing == set(), "alerts without a unit test in which they fire"
    assert alerts - quiet == set(), "alerts without a unit test in which they stay quiet"


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    anchors = _github_anchors(ALERTS_DOC.read_text())
    problems = []
    for name, rule in _alerts().items():
        labels, annotations = rule.get("labels", {}), rule.get("annotations", {})
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity {labels.get('severity')!r}")
        for key in ("summary", "description"):
            if not str(annotations.get(key, "")).strip():
                problems.append(f"{name}: no {key}")
        runbook = annotations.get("runbook_url", "")
        if runbook != f"docs/alerts.md#{name.lower()}":
            problems.append(f"{name}: runbook_url {runbook!r}")
        if name.lower() not in anchors:
            problems.append(f"{name}: no section `### {name}` in docs/alerts.md")

    assert problems == []


def test_recording_rules_follow_the_naming_convention() -> None:
    # level:metric:operations, so dashboards can tell a recorded series from an exported one.
    for name in _recorded():
        assert re.fullmatch(r"sentinel:[a-z0-9_]+(:[a-z0-9_]+)?", name), name


def test_rules_select_only_metrics_sentinel_exports(exported: ExportedMetrics) -> None:
    defined = exported.all | _recorded() | PROMETHEUS_SERIES
    unknown = {}
    for rule in _rules():
        missing = selected_metrics(rule["expr"]) - defined
        if missing:
            unknown[rule.get("alert") or rule["record"]] = sorted(missing)

    assert unknown == {}


def test_the_live_scrape_sees_both_programs_metrics(exported: ExportedMetrics) -> None:
    # The comparison above is only as good as the scrape: both programs, GPU metrics included.
    assert "sentinel_agents" in exported.control_plane
    assert "sentinel_commands_total" in exported.control_plane
    assert "sentinel_telemetry_flush_seconds_bucket" in exported.control_plane
    assert "DCGM_FI_DEV_XID_ERRORS" in exported.agent
    assert "sentinel_agent_certificate_expiry_timestamp_seconds" in exported.agent
    assert "DCGM_FI_DEV_XID_ERRORS" not in exported.control_plane


def test_metric_names_are_found_inside_functions_aggregations_and_offsets() -> None:
    expression = (
        "sum by (le) (rate(a_bucket[5m])) / on () group_left b offset 5m"
        " and max_over_time(c[10m:1m]) or label_replace(d, 'x', '$1', 'y', '(.*)')"
    )

    assert selected_metrics(expression) == {"a_bucket", "b", "c", "d"}
    with pytest.raises(ValueError, match="without a metric name"):
        selected_metrics('{__name__=~"sentinel_.+"}')


def test_declared_families_count_before_their_first_sample() -> None:
    exposition = (
        "# HELP sentinel_x_total Things.\n# TYPE sentinel_x_total counter\n"
        "# HELP sentinel_y_seconds Time.\n# TYPE sentinel_y_seconds histogram\n"
    )

    assert series_names(exposition) == {
        "sentinel_x_total",
        "sentinel_y_seconds_bucket",
        "sentinel_y_seconds_count",
        "sentinel_y_seconds_sum",
    }
