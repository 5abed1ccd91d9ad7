"""The policy engine on its own (no server): the shipped guardrails, how violations are reported,
failing closed, determinism, outcomes, policy checks and the YAML loader."""

from __future__ import annotations

import dataclasses
import datetime as dt
import pathlib
from typing import Any

import pytest

from controlplane.policy import (
    Effect,
    EvaluationContext,
    ExpressionError,
    Policy,
    PolicyEngine,
    PolicyInvalid,
    Rule,
    Scope,
    Verdict,
    check_policy,
    compile_expression,
    load_policy_files,
)

GUARDRAILS = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "policies" / "guardrails.yaml"
WEDNESDAY = dt.datetime(2026, 3, 4, 10, 0, tzinfo=dt.UTC)


def node_step(action: str, nodes: list[str], index: int = 0, **parameters: Any) -> dict[str, Any]:
    return {
        "index": index,
        "step_id": f"step-{index}",
        "action": action,
        "targets": [{"node_id": n} for n in nodes],
        "node_ids": nodes,
        "parameters": parameters,
        "timeout_seconds": 60.0,
    }


def k8s_step(
    action: str, cluster: str, namespace: str, index: int = 0, **parameters: Any
) -> dict[str, Any]:
    target = {"cluster": cluster, "namespace": namespace, "kind": "Deployment", "name": "web"}
    return {
        "index": index,
        "step_id": f"step-{index}",
        "action": action,
        "targets": [{"kubernetes": target}],
        "node_ids": [],
        "parameters": parameters,
        "timeout_seconds": 60.0,
    }


def plan(*steps: dict[str, Any], confidence: float = 0.95) -> dict[str, Any]:
    steps_list = [dict(s, index=i, step_id=f"step-{i}") for i, s in enumerate(steps)]
    node_ids = list(dict.fromkeys(n for s in steps_list for n in s["node_ids"]))
    targets: dict[str, None] = {}
    for step in steps_list:
        for t in step["targets"]:
            if "node_id" in t:
                targets[f"node/{t['node_id']}"] = None
            else:
                k = t["kubernetes"]
                key = f"k8s/{k['cluster']}/{k['namespace']}/{k['kind']}/{k['name']}"
                targets[key] = None
    return {
        "plan_id": "plan-1",
        "request_id": "req-1",
        "source": "inframind",
        "rationale": "test",
        "confidence": confidence,
        "submitted_by": "spiffe://sentinel.local/service/inframind",
        "expire_time": None,
        "steps": steps_list,
        "health_gates": [],
        "limits": {"max_nodes_in_parallel": 1, "max_replicas_in_parallel": 0},
        "node_ids": node_ids,
        "targets": list(targets),
    }


def context(
    *,
    now: dt.datetime = WEDNESDAY,
    fleet_size: int = 100,
    cordoned: frozenset[str] = frozenset(),
    recent: dict[str, int] | None = None,
) -> EvaluationContext:
    return EvaluationContext(
        now=now,
        fleet_size=fleet_size,
        connected_nodes=fleet_size,
        cordoned_nodes=cordoned,
        recent_plans_by_target=recent or {},
        rate_window_s=3600.0,
    )


def guardrails(*, with_freeze: bool = False) -> PolicyEngine:
    policies = load_policy_files(str(GUARDRAILS))
    if with_freeze:
        policies = [dataclasses.replace(p, enabled=True) for p in policies]
    engine = PolicyEngine()
    engine.replace_policies(policies)
    return engine


def fired(verdict: Verdict) -> list[tuple[str, str]]:
    return [(v.rule_id, v.field) for v in verdict.violations]


SAFE_PLAN = plan(node_step("set_gpu_power_limit", ["n1"], watts=300))


def test_safe_plan_passes_every_guardrail() -> None:
    verdict = guardrails(with_freeze=True).evaluate(SAFE_PLAN, context())
    assert fired(verdict) == []
    assert verdict.outcome == "APPROVED"


@pytest.mark.parametrize(
    ("breaking", "keeping", "rule_id", "field"),
    [
        (
            plan(k8s_step("restart", "dev-cluster", "inference")),
            plan(k8s_step("restart", "prod-a", "inference")),
            "allowed-clusters",
            "steps[0].targets",
        ),
        (
            plan(k8s_step("restart", "prod-a", "kube-system")),
            plan(k8s_step("restart", "prod-a", "batch")),
            "allowed-namespaces",
            "steps[0].targets",
        ),
        (
            plan(node_step("set_gpu_power_limit", ["n1"], watts=750)),
            plan(node_step("set_gpu_power_limit", ["n1"], watts=700)),
            "gpu-power-limit-range",
            "steps[0].parameters.watts",
        ),
        (
            plan(node_step("set_gpu_power_limit", ["n1"], watts=99.5)),
            plan(node_step("set_gpu_power_limit", ["n1"], watts=100)),
            "gpu-power-limit-range",
            "steps[0].parameters.watts",
        ),
        (
            plan(node_step("set_gpu_power_limit", ["n1"], per_gpu_watts={"0": 300, "1": 50})),
            plan(node_step("set_gpu_power_limit", ["n1"], per_gpu_watts={"0": 300, "1": 150})),
            "per-gpu-power-limit-range",
            "steps[0].parameters.per_gpu_watts",
        ),
        (
            plan(k8s_step("scale", "prod-a", "inference", replicas=51.0)),
            plan(k8s_step("scale", "prod-a", "inference", replicas=50.0)),
            "replica-cap",
            "steps[0].parameters.replicas",
        ),
        (
            plan(k8s_step("rollout", "prod-a", "inference", container="m", max_surge="50%")),
            plan(k8s_step("rollout", "prod-a", "inference", container="m", max_surge="25%")),
            "rollout-max-surge",
            "steps[0].parameters.max_surge",
        ),
        (
            plan(k8s_step("rollout", "prod-a", "inference", container="m", max_surge=11.0)),
            plan(k8s_step("rollout", "prod-a", "inference", container="m", max_surge=10.0)),
            "rollout-max-surge",
            "steps[0].parameters.max_surge",
        ),
        (
            plan(node_step("set_gpu_power_limit", [f"n{i}" for i in range(26)], watts=300)),
            plan(node_step("set_gpu_power_limit", [f"n{i}" for i in range(25)], watts=300)),
            "blast-radius",
            "node_ids",
        ),
        (
            plan(confidence=0.79),
            plan(confidence=0.8),
            "low-confidence-needs-approval",
            "confidence",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_guardrail_fires_on_a_plan_that_breaks_it_and_not_on_one_that_keeps_it(
    breaking: dict[str, Any], keeping: dict[str, Any], rule_id: str, field: str
) -> None:
    engine = guardrails()
    if not breaking["steps"]:
        breaking["steps"] = keeping["steps"] = SAFE_PLAN["steps"]
        breaking["node_ids"] = keeping["node_ids"] = SAFE_PLAN["node_ids"]
        breaking["targets"] = keeping["targets"] = SAFE_PLAN["targets"]
    assert fired(engine.evaluate(breaking, context())) == [(rule_id, field)]
    assert fired(engine.evaluate(keeping, context())) == []


def test_blast_radius_always_allows_a_single_node_even_in_a_tiny_fleet() -> None:
    engine = guardrails()
    one_node = plan(node_step("set_gpu_power_limit", ["n1"], watts=300))
    two_nodes = plan(node_step("set_gpu_power_limit", ["n1", "n2"], watts=300))
    assert fired(engine.evaluate(one_node, context(fleet_size=2))) == []
    assert fired(engine.evaluate(two_nodes, context(fleet_size=7))) == [
        ("blast-radius", "node_ids")
    ]
    assert fired(engine.evaluate(two_nodes, context(fleet_size=8))) == []


def test_rate_limit_counts_earlier_plans_per_target() -> None:
    engine = guardrails()
    assert fired(engine.evaluate(SAFE_PLAN, context(recent={"node/n1": 3}))) == [
        ("rate-limit-per-target", "targets")
    ]
    assert fired(engine.evaluate(SAFE_PLAN, context(recent={"node/n1": 2, "node/n9": 7}))) == []


def test_cordoned_nodes_take_only_uncordon_and_diagnostics() -> None:
    engine = guardrails()
    cordoned = frozenset({"n2"})
    power = plan(node_step("set_gpu_power_limit", ["n1", "n2"], watts=300))
    assert fired(engine.evaluate(power, context(cordoned=cordoned))) == [
        ("no-work-on-cordoned-nodes", "steps[0].node_ids")
    ]
    for action in ("uncordon", "run_diagnostic"):
        allowed = plan(node_step(action, ["n1", "n2"]))
        assert fired(engine.evaluate(allowed, context(cordoned=cordoned))) == []


def test_change_freeze_is_off_by_default_and_when_on_freezes_weekends_but_not_diagnostics() -> None:
    saturday = dt.datetime(2026, 3, 7, 23, 30, tzinfo=dt.UTC)
    assert fired(guardrails().evaluate(SAFE_PLAN, context(now=saturday))) == []
    frozen = guardrails(with_freeze=True)
    assert fired(frozen.evaluate(SAFE_PLAN, context(now=saturday))) == [("weekend-freeze", "steps")]
    diagnostic = plan(node_step("run_diagnostic", ["n1"]))
    assert fired(frozen.evaluate(diagnostic, context(now=saturday))) == []
    christmas_eve = dt.datetime(2026, 12, 24, 9, 0, tzinfo=dt.UTC)  # a Thursday
    assert fired(frozen.evaluate(SAFE_PLAN, context(now=christmas_eve))) == [
        ("year-end-freeze", "steps")
    ]
    assert fired(frozen.evaluate(SAFE_PLAN, context(now=WEDNESDAY))) == []


def test_every_violation_is_listed_with_rule_message_field_and_step_index() -> None:
    bad = plan(
        node_step("set_gpu_power_limit", ["n1"], watts=300),
        node_step("set_gpu_power_limit", ["n2"], watts=800),
        k8s_step("scale", "elsewhere", "inference", replicas=500),
        confidence=0.5,
    )
    verdict = guardrails().evaluate(bad, context())
    assert fired(verdict) == [
        ("allowed-clusters", "steps[2].targets"),
        ("gpu-power-limit-range", "steps[1].parameters.watts"),
        ("replica-cap", "steps[2].parameters.replicas"),
        ("low-confidence-needs-approval", "confidence"),
    ]
    first = verdict.rejections[0]
    assert first.policy_id == "guardrails"
    assert first.effect is Effect.REJECT
    assert "allowed cluster" in first.message
    assert verdict.approvals_required[0].effect is Effect.REQUIRE_APPROVAL
    assert verdict.outcome == "REJECTED"


def _engine(*rules: Rule, policy_id: str = "p") -> PolicyEngine:
    engine = PolicyEngine()
    engine.replace_policies([Policy(policy_id, "", rules)])
    return engine


def test_only_approval_rules_violated_means_awaiting_approval() -> None:
    engine = _engine(
        Rule("ok", "true", "never"),
        Rule("ask", "plan.confidence > 0.99", "ask first", effect=Effect.REQUIRE_APPROVAL),
    )
    verdict = engine.evaluate(SAFE_PLAN, context())
    assert verdict.outcome == "AWAITING_APPROVAL"
    assert verdict.rejections == ()
    assert [v.rule_id for v in verdict.approvals_required] == ["ask"]


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("plan.limits.deadline_seconds > 0.0", "no such key 'deadline_seconds'"),
        ("plan.confidence + 'x' == 'y'", "operation"),
        ("plan.steps[7].action == 'cordon'", "index"),
        ("plan.confidence", "not a bool"),
    ],
)
def test_a_rule_that_cannot_be_evaluated_counts_as_violated(expression: str, why: str) -> None:
    verdict = _engine(Rule("fragile", expression, "the original message")).evaluate(
        SAFE_PLAN, context()
    )
    assert [v.rule_id for v in verdict.rejections] == ["fragile"]
    message = verdict.rejections[0].message
    assert "could not be evaluated" in message
    assert why in message
    assert "the original message" in message


def test_step_rule_reports_each_failing_step_and_fails_closed_per_step() -> None:
    engine = _engine(
        Rule(
            "watts",
            "step.parameters.watts <= 400",
            "too much",
            field="steps[{index}].parameters.watts",
            scope=Scope.STEP,
        )
    )
    three = plan(
        node_step("set_gpu_power_limit", ["n1"], watts=500),
        node_step("cordon", ["n2"]),
        node_step("set_gpu_power_limit", ["n3"], watts=300),
    )
    verdict = engine.evaluate(three, context())
    assert fired(verdict) == [
        ("watts", "steps[0].parameters.watts"),
        ("watts", "steps[1].parameters.watts"),
    ]
    assert verdict.rejections[0].message == "too much"
    assert "no such key 'watts'" in verdict.rejections[1].message


def test_policies_are_evaluated_in_id_order_and_results_are_identical_every_time() -> None:
    engine = PolicyEngine()
    engine.replace_policies(
        [
            Policy("zeta", "", (Rule("z1", "false", "z"),)),
            Policy("alpha", "", (Rule("a2", "false", "a2"), Rule("a1", "false", "a1"))),
            Policy("off", "", (Rule("o", "false", "o"),), enabled=False),
        ]
    )
    first = engine.evaluate(SAFE_PLAN, context())
    assert [(v.policy_id, v.rule_id) for v in first.violations] == [
        ("alpha", "a2"),
        ("alpha", "a1"),
        ("zeta", "z1"),
    ]
    assert all(engine.evaluate(SAFE_PLAN, context()) == first for _ in range(50))
    assert [p.policy_id for p in engine.policies()] == ["alpha", "off", "zeta"]


def test_evaluation_hook_receives_duration_and_verdict() -> None:
    seen: list[tuple[float, Verdict]] = []
    engine = PolicyEngine(on_evaluated=lambda seconds, verdict: seen.append((seconds, verdict)))
    engine.replace_policies([Policy("p", "", (Rule("r", "false", "no"),))])
    verdict = engine.evaluate(SAFE_PLAN, context())
    assert len(seen) == 1
    assert seen[0][0] >= 0
    assert seen[0][1] == verdict


def test_bad_policy_lists_every_problem_with_its_path() -> None:
    bad = Policy(
        "Not Valid",
        "",
        (
            Rule("ok", "plan.confidence >", "syntax"),
            Rule("ok", "true", "duplicate"),
            Rule("empty", "  ", "empty"),
            Rule("unknown", "flet.size > 0", "typo"),
            Rule("step-only", "step.action == 'cordon'", "needs STEP scope"),
        ),
    )
    with pytest.raises(PolicyInvalid) as caught:
        check_policy(bad)
    paths = [path for path, _ in caught.value.problems]
    assert paths == [
        "policy_id",
        "rules[0].expression",
        "rules[1].rule_id",
        "rules[2].expression",
        "rules[3].expression",
        "rules[4].expression",
    ]
    messages = dict(caught.value.problems)
    assert "Syntax error" in messages["rules[0].expression"]
    assert "column" in messages["rules[0].expression"]
    assert "flet" in messages["rules[3].expression"]


def test_macro_variables_are_not_mistaken_for_unknown_variables() -> None:
    check_policy(
        Policy(
            "p",
            "",
            (Rule("r", "plan.steps.all(s, s.node_ids.exists(n, n in fleet.cordoned))", "m"),),
        )
    )


def test_replacing_with_an_invalid_policy_names_it_and_keeps_the_old_set() -> None:
    engine = _engine(Rule("r", "false", "old"))
    with pytest.raises(PolicyInvalid, match=r"policy 'broken'.*rules\[0\]\.expression"):
        engine.replace_policies([Policy("broken", "", (Rule("r", "(", "m"),))])
    assert [v.message for v in engine.evaluate(SAFE_PLAN, context()).violations] == ["old"]


def test_yaml_file_with_a_bad_rule_is_refused_naming_file_and_path(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "a.yaml").write_text(
        "policy_id: fine\nrules:\n  - {rule_id: r, expression: 'true', message: m}\n"
    )
    (tmp_path / "b.yml").write_text(
        "- policy_id: second\n"
        "  rules:\n"
        "    - {rule_id: r, expression: 'plan.x ==', message: m, effect: maybe}\n"
    )
    with pytest.raises(PolicyInvalid) as caught:
        load_policy_files(str(tmp_path))
    text = str(caught.value)
    assert str(tmp_path / "b.yml") in text
    assert "[0].rules[0].expression: Syntax error" in text
    assert "[0].rules[0].effect: must be one of REJECT, REQUIRE_APPROVAL" in text


def test_yaml_directory_loads_sorted_files_with_their_origin(tmp_path: pathlib.Path) -> None:
    for name in ("b.yaml", "a.yml"):
        (tmp_path / name).write_text(
            f"policy_id: {name[0]}\nrules:\n  - {{rule_id: r, expression: 'true', message: m}}\n"
        )
    (tmp_path / "notes.txt").write_text("not a policy")
    policies = load_policy_files(f"{tmp_path}, {GUARDRAILS}")
    assert [p.policy_id for p in policies] == ["a", "b", "guardrails", "change-freeze"]
    assert policies[0].origin == f"file:{tmp_path / 'a.yml'}"


def test_missing_policy_path_is_refused() -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_policy_files("/nonexistent/policies.yaml")


def test_compiled_expression_evaluates_over_an_activation_and_explains_errors() -> None:
    gate = compile_expression("gpu.temperature_c < 85.0 && size(gpus) > 0")
    assert gate.evaluate({"gpu": {"temperature_c": 70.0}, "gpus": [1]}) is True
    with pytest.raises(ExpressionError, match="no such key 'temperature_c'"):
        gate.evaluate({"gpu": {}, "gpus": [1]})
    with pytest.raises(ExpressionError, match="Syntax error"):
        compile_expression("gpu.temperature_c <")
