"""The client library's parts that need no server: the retry schedule, reading field paths
out of status messages, settings from the environment, and plan and policy files."""

from __future__ import annotations

import pathlib

import grpc
import pytest
from sentinel.v1 import plan_pb2, policy_pb2

from sentinelclient import (
    ConnectionSettings,
    DocumentError,
    FieldProblem,
    RetryPolicy,
    SentinelError,
    TlsFiles,
    load_plan,
    load_policies,
)
from sentinelclient._errors import field_problems
from sentinelclient._retry import Backoff
from sentinelclient._values import submit_request


def _error(code: grpc.StatusCode, retry_after_s: float | None = None) -> SentinelError:
    return SentinelError(code, "x", retry_after_s=retry_after_s)


def test_backoff_is_full_jitter_under_a_growing_cap_and_stops_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2)
    top = Backoff(policy, rng=lambda: 0.999999)
    caps = [top.delay_after(_error(grpc.StatusCode.UNAVAILABLE)) for _ in range(5)]
    assert caps[:4] == pytest.approx([0.1, 0.2, 0.3, 0.3], rel=1e-4)
    assert caps[4] is None  # five attempts made
    bottom = Backoff(policy, rng=lambda: 0.0)
    assert bottom.delay_after(_error(grpc.StatusCode.DEADLINE_EXCEEDED)) == 0.0


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # without a retry delay: not "try later"
        grpc.StatusCode.INTERNAL,
    ],
)
def test_refusals_are_not_retried(code: grpc.StatusCode) -> None:
    assert Backoff(RetryPolicy()).delay_after(_error(code)) is None


def test_a_server_retry_delay_is_waited_for_a_little_longer_unless_it_is_too_long() -> None:
    policy = RetryPolicy(max_server_delay_s=5.0)
    busy = _error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=2.0)
    assert Backoff(policy, rng=lambda: 0.0).delay_after(busy) == 2.0
    assert Backoff(policy, rng=lambda: 1.0).delay_after(busy) == pytest.approx(2.4)
    too_long = _error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=60.0)
    assert Backoff(policy).delay_after(too_long) is None


def test_field_problems_are_read_from_the_servers_message() -> None:
    message = (
        "plan.request_id: differs from request_id; set one of them, or both the same; "
        "plan.steps[1].parameters.watts: must be positive; supported: a, b"
    )
    assert field_problems(message) == (
        FieldProblem(
            "plan.request_id", "differs from request_id; set one of them, or both the same"
        ),
        FieldProblem("plan.steps[1].parameters.watts", "must be positive; supported: a, b"),
    )
    assert field_problems("too many login attempts: retry in 1.0 s") == ()
    assert field_problems("serial: not hex; reason: too long") == (
        FieldProblem("serial", "not hex"),
        FieldProblem("reason", "too long"),
    )


def test_settings_come_from_the_environment_and_flags_override_them(
    tmp_path: pathlib.Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    env = {
        "SENTINEL_SERVER": "cp:7443",
        "SENTINEL_CERTS_DIR": str(tmp_path),
        "SENTINEL_IDENTITY": "planner-inframind",
        "SENTINEL_KEY": "/keys/mine.key",
        "SENTINEL_TOKEN_FILE": str(token_file),
    }
    settings = ConnectionSettings.from_environment(env, server=None, identity="viewer-x")
    assert settings.server == "cp:7443"
    assert settings.tls_files() == TlsFiles(
        tmp_path / "ca.pem", tmp_path / "viewer-x.pem", pathlib.Path("/keys/mine.key")
    )
    assert settings.bearer_token() == "abc"
    assert "abc" not in repr(ConnectionSettings(token="abc"))


def test_submissions_keep_one_request_id_the_callers_the_plans_or_a_new_one() -> None:
    plan = plan_pb2.Plan(source="x")
    generated = submit_request(plan, None, validate_only=False).request_id
    assert generated.startswith("client-")
    assert submit_request(plan, "mine", validate_only=False).request_id == "mine"
    own = plan_pb2.Plan(source="x", request_id="in-plan")
    assert submit_request(own, None, validate_only=False).request_id == "in-plan"
    assert submit_request(plan, None, validate_only=True).request_id == ""


def test_a_yaml_plan_reads_like_its_json(tmp_path: pathlib.Path) -> None:
    example = pathlib.Path(__file__).parents[2] / "deploy/examples/plan-telemetry-interval.json"
    path = tmp_path / "plan.yaml"
    path.write_text(
        "source: operator\n"
        "expire_time: 2099-01-02T03:04:05Z\n"  # unquoted: YAML reads a datetime
        "steps:\n"
        "  - step_id: slow-down\n"
        "    action: set_telemetry_interval\n"
        "    targets: [{node_id: node-1}]\n"
        "    parameters: {seconds: 10}\n"
        "    timeout: 30s\n"
    )
    plan = load_plan(path)
    assert plan.expire_time.ToJsonString() == "2099-01-02T03:04:05Z"
    assert plan.steps[0].timeout.seconds == 30
    assert plan.steps[0].targets[0].node_id == "node-1"
    assert load_plan(example).steps[0].step_id == "slow-down"
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: not a list\n")
    with pytest.raises(DocumentError, match=r"not a sentinel\.v1\.Plan"):
        load_plan(broken)


def test_policy_files_use_the_short_enum_names_of_deploy_policies() -> None:
    shipped = pathlib.Path(__file__).parents[2] / "deploy/policies/guardrails.yaml"
    [guardrails, *_] = load_policies(shipped)
    assert guardrails.policy_id == "guardrails" and guardrails.enabled
    scopes = {rule.scope for rule in guardrails.rules}
    assert policy_pb2.POLICY_RULE_SCOPE_STEP in scopes
    effects = {rule.effect for rule in guardrails.rules}
    assert policy_pb2.POLICY_EFFECT_REQUIRE_APPROVAL in effects
