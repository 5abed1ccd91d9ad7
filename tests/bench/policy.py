"""The policy benchmark: time to evaluate 50 rules (PLAN and STEP scope) against a plan of 5 steps
x 20 nodes with the policy engine, against the same 50 checks written as plain Python functions.

    python -m tests.bench.policy [--evaluations 2000] [--json out.json]

See tests/bench/README.md ("Policy benchmark") for what the figures mean.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from controlplane.policy import EvaluationContext, Policy, PolicyEngine, Rule, Scope
from controlplane.policy._cel import to_context

STEPS, NODES_PER_STEP, KINDS_REPEATED = 5, 20, 5
ALLOWED_NAMESPACES = ["inference", "training", "batch"]
NODE_ACTIONS = ["set_gpu_power_limit", "set_telemetry_interval", "run_diagnostic", "cordon"]

# check(plan, env, step) -> passed; `step` is {} for PLAN rules.
Check = Callable[..., bool]


def _rules_and_checks() -> list[tuple[Rule, Check]]:
    """Ten kinds of rule, each five times with other constants: 25 PLAN and 25 STEP rules, each
    with its plain-Python twin (`check(plan, env, step)`)."""
    out: list[tuple[Rule, Check]] = []
    for k in range(KINDS_REPEATED):
        confidence, cap, watts, per_step = 0.5 + k / 10, 3 + k, 600 + 20 * k, 20 + k
        timeout = 100.0 + k

        def rule(n: str, expr: str, scope: Scope = Scope.PLAN, k: int = k) -> Rule:
            return Rule(f"{n}-{k}", expr, f"{n} violated", f"{n}", scope=scope)

        out += [
            (
                rule("confidence", f"plan.confidence >= {confidence}"),
                lambda p, e, s, c=confidence: p["confidence"] >= c,
            ),
            (
                rule("blast", "size(plan.node_ids) <= 1 || size(plan.node_ids) * 4 <= fleet.size"),
                lambda p, e, s: (
                    len(p["node_ids"]) <= 1 or len(p["node_ids"]) * 4 <= e["fleet"]["size"]
                ),
            ),
            (
                rule(
                    "rate",
                    f"[history.recent].all(recent, plan.targets.all(t, !(t in recent) || "
                    f"recent[t] < {cap}))",
                ),
                lambda p, e, s, c=cap: all(
                    e["history"]["recent"].get(t, 0) < c for t in p["targets"]
                ),
            ),
            (
                rule("timeout", f"plan.steps.all(s, s.timeout_seconds <= {timeout})"),
                lambda p, e, s, t=timeout: all(x["timeout_seconds"] <= t for x in p["steps"]),
            ),
            (
                rule("cordoned", "!plan.node_ids.exists(n, n in fleet.cordoned)"),
                lambda p, e, s: not any(n in e["fleet"]["cordoned"] for n in p["node_ids"]),
            ),
            (
                rule(
                    "watts",
                    "step.action != 'set_gpu_power_limit' || "
                    f"(step.parameters.watts >= 100 && step.parameters.watts <= {watts})",
                    Scope.STEP,
                ),
                lambda p, e, s, w=watts: (
                    s["action"] != "set_gpu_power_limit" or 100 <= s["parameters"]["watts"] <= w
                ),
            ),
            (
                rule(
                    "namespace",
                    "step.targets.all(t, !has(t.kubernetes) || "
                    f"t.kubernetes.namespace in {ALLOWED_NAMESPACES})",
                    Scope.STEP,
                ),
                lambda p, e, s: all(
                    "kubernetes" not in t or t["kubernetes"]["namespace"] in ALLOWED_NAMESPACES
                    for t in s["targets"]
                ),
            ),
            (
                rule("per-step", f"size(step.node_ids) <= {per_step}", Scope.STEP),
                lambda p, e, s, n=per_step: len(s["node_ids"]) <= n,
            ),
            (
                rule("action", f"step.action in {NODE_ACTIONS}", Scope.STEP),
                lambda p, e, s: s["action"] in NODE_ACTIONS,
            ),
            (
                rule(
                    "step-cordoned",
                    "step.action == 'uncordon' || "
                    "[fleet.cordoned].all(c, !step.node_ids.exists(n, n in c))",
                    Scope.STEP,
                ),
                lambda p, e, s: (
                    s["action"] == "uncordon"
                    or not any(n in e["fleet"]["cordoned"] for n in s["node_ids"])
                ),
            ),
        ]
    return out


def _plan() -> dict[str, Any]:
    node_ids = [f"node-{i:03d}-{j:02d}" for i in range(STEPS) for j in range(NODES_PER_STEP)]
    return {
        "plan_id": "plan-bench",
        "request_id": "req-bench",
        "source": "inframind",
        "rationale": "cap power for the evening peak",
        "confidence": 0.92,
        "submitted_by": "spiffe://sentinel.local/service/inframind",
        "expire_time": dt.datetime(2026, 3, 4, 12, tzinfo=dt.UTC),
        "steps": [
            {
                "index": i,
                "step_id": f"step-{i}",
                "action": "set_gpu_power_limit",
                "targets": [{"node_id": n} for n in node_ids[i * 20 : (i + 1) * 20]],
                "node_ids": node_ids[i * NODES_PER_STEP : (i + 1) * NODES_PER_STEP],
                "parameters": {"watts": 650},
                "timeout_seconds": 102.0,
            }
            for i in range(STEPS)
        ],
        "health_gates": [{"name": "temp", "expression": "gpu.temp < 85.0", "window_seconds": 60}],
        "limits": {"max_nodes_in_parallel": 10, "max_replicas_in_parallel": 0},
        "node_ids": node_ids,
        "targets": [f"node/{n}" for n in node_ids],
    }


def _context(plan: dict[str, Any]) -> EvaluationContext:
    return EvaluationContext(
        now=dt.datetime(2026, 3, 4, 10, tzinfo=dt.UTC),
        fleet_size=1000,
        connected_nodes=990,
        cordoned_nodes=frozenset({"node-999-00", "node-998-00"}),
        recent_plans_by_target={t: i % 6 for i, t in enumerate(plan["targets"])},
        rate_window_s=3600.0,
    )


def _python_baseline(
    checks: list[tuple[Rule, Check]], plan: dict[str, Any], context: EvaluationContext
) -> list[tuple[str, str]]:
    env = {
        "fleet": {"size": context.fleet_size, "cordoned": set(context.cordoned_nodes)},
        "history": {"recent": context.recent_plans_by_target},
    }
    failed: list[tuple[str, str]] = []
    for rule, check in checks:
        if rule.scope is Scope.PLAN:
            if not check(plan, env, {}):
                failed.append((rule.rule_id, rule.field))
            continue
        for step in plan["steps"]:
            if not check(plan, env, step):
                failed.append((rule.rule_id, rule.field))
    return failed


def _timed(work: Callable[[], Any], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return samples


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]  # nearest rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    checks = _rules_and_checks()
    engine = PolicyEngine()
    compile_started = time.perf_counter()
    engine.replace_policies([Policy("bench", "50 rules", tuple(r for r, _ in checks))])
    compile_s = time.perf_counter() - compile_started
    plan = _plan()
    context = _context(plan)

    # Both sides must judge alike, or the comparison means nothing.
    verdict = engine.evaluate(plan, context)
    engine_result = [(v.rule_id, v.field) for v in verdict.violations]
    baseline_result = _python_baseline(checks, plan, context)
    if engine_result != baseline_result:
        raise SystemExit(f"engine and baseline disagree:\n{engine_result}\n{baseline_result}")

    # The rate rule written without binding the nested map once (see the README).
    naive_rate = PolicyEngine()
    naive_expression = "plan.targets.all(t, !(t in history.recent) || history.recent[t] < 9)"
    naive_rate.replace_policies([Policy("naive", "", (Rule("rate", naive_expression, "m"),))])

    for _ in range(args.warmup):
        engine.evaluate(plan, context)
        _python_baseline(checks, plan, context)
    rows = {
        "engine (CEL)": _timed(lambda: engine.evaluate(plan, context), args.evaluations),
        "plain Python": _timed(lambda: _python_baseline(checks, plan, context), args.evaluations),
        "one naive rate rule alone": _timed(
            lambda: naive_rate.evaluate(plan, context), args.evaluations
        ),
        "of which: plan -> CEL values": _timed(
            lambda: to_context({"plan": plan, "now": context.now}), args.evaluations
        ),
    }
    plan_rules = sum(r.scope is Scope.PLAN for r, _ in checks)
    print(
        f"{len(checks)} rules ({plan_rules} PLAN, {len(checks) - plan_rules} STEP), plan of "
        f"{STEPS} steps x {NODES_PER_STEP} nodes, {args.evaluations} evaluations each, "
        f"{len(engine_result)} violations per plan; compiling the rules took "
        f"{compile_s * 1e3:.1f} ms"
    )
    print(f"{'':32} {'median µs':>10} {'p99 µs':>10}")
    summary: dict[str, Any] = {"rules": len(checks), "evaluations": args.evaluations}
    for name, samples in rows.items():
        median, p99 = statistics.median(samples) * 1e6, _p99(samples) * 1e6
        summary[name] = {"median_us": median, "p99_us": p99}
        print(f"{name:32} {median:10.1f} {p99:10.1f}")
    ratio = summary["engine (CEL)"]["median_us"] / summary["plain Python"]["median_us"]
    summary["ratio_median"] = ratio
    print(f"{'engine / plain Python (median)':32} {ratio:10.2f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
