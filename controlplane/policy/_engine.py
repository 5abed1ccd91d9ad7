"""The policy engine: checks policies, compiles their rules once, and evaluates every enabled
rule against a plan document, deterministically and failing closed."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cel

from controlplane.policy._cel import (
    ExpressionError,
    compile_program,
    describe_error,
    free_variables,
    to_context,
)
from controlplane.policy._model import (
    Effect,
    EvaluationContext,
    Policy,
    PolicyInvalid,
    Rule,
    Scope,
    Verdict,
    Violation,
)

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9\-_.]{0,127}")
MAX_EXPRESSION_LENGTH = 10_000
PLAN_VARIABLES = frozenset({"plan", "fleet", "history", "now", "source", "breaker"})
# `source` of a plan whose source has no history in the calibration window: no evidence
# against it (hit rate 1).
_NO_CALIBRATION: dict[str, Any] = {
    "prediction_hit_rate": 1.0,
    "predictions": 0,
    "predictions_held": 0,
    "recent_rollbacks": 0,
    "plans": 0,
    "mean_confidence": 0.0,
}
STEP_VARIABLES = PLAN_VARIABLES | {"step", "index"}


def _check_id(value: str, what: str) -> str | None:
    if not value:
        return f"required: the {what} id"
    if ID_PATTERN.fullmatch(value) is None:
        return (
            f"{value!r} is not a valid {what} id: lowercase letters, digits, '-', '_' and '.', "
            "starting with a letter or digit, at most 128 characters"
        )
    return None


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    policy_id: str
    rule: Rule
    program: cel.Program


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The enabled rules in force at one moment and the variables they read: taken once per
    plan, so that what is gathered for the plan (history is a database read) and the rules that
    judge it come from the same set of policies."""

    rules: tuple[_CompiledRule, ...] = ()
    variables: frozenset[str] = frozenset()
    """Every name the rules refer to (names bound by `all`, `map`, ... included: a superset)."""
    plan_fields: frozenset[str] | None = frozenset()
    """The fields of `plan` the rules select (`plan.confidence`); None: the whole plan."""

    def reads(self, variable: str) -> bool:
        """Whether any rule refers to `variable` (`history`, `fleet`, ...)."""
        return variable in self.variables


# `plan` as a whole word, the name selected from it when there is one, and an opening
# parenthesis after that name (`plan.all(...)`: a macro over the plan, not a field).
_PLAN_REFERENCE = re.compile(r"\bplan\b(?:\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)(\s*\()?)?")


def _plan_fields(source: str) -> set[str] | None:
    """The fields `source` selects from `plan`, or None when it uses `plan` otherwise (passed
    on whole, indexed, a macro or function over it, bound by a macro): then every field counts.
    Read from the text, so a `plan.x` inside a string literal adds a field it does not read;
    never one less."""
    fields: set[str] = set()
    for match in _PLAN_REFERENCE.finditer(source):
        field, call = match.groups()
        if field is None or call is not None:
            return None
        fields.add(field)
    return fields


def _rule_set(rules: list[_CompiledRule]) -> RuleSet:
    # Program.variables() lists every identifier, comprehension bindings too: a binding that
    # shadows a real variable's name still counts that variable as read.
    names = {str(name) for rule in rules for name in rule.program.variables()}
    plan_fields: set[str] | None = set()
    for rule in rules:
        fields = _plan_fields(rule.rule.expression)
        if fields is None or plan_fields is None:
            plan_fields = None
        else:
            plan_fields |= fields
    return RuleSet(
        tuple(rules), frozenset(names), None if plan_fields is None else frozenset(plan_fields)
    )


def _compile_policy(policy: Policy) -> tuple[list[_CompiledRule], list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    compiled: list[_CompiledRule] = []
    if problem := _check_id(policy.policy_id, "policy"):
        problems.append(("policy_id", problem))
    if not policy.rules:
        problems.append(("rules", "a policy needs at least one rule"))
    if "\x00" in policy.description:
        problems.append(("description", "must not contain NUL characters"))
    first_at: dict[str, int] = {}
    for i, rule in enumerate(policy.rules):
        at = f"rules[{i}]"
        if problem := _check_id(rule.rule_id, "rule"):
            problems.append((f"{at}.rule_id", problem))
        elif rule.rule_id in first_at:
            problems.append(
                (
                    f"{at}.rule_id",
                    f"duplicate rule id {rule.rule_id!r} (also rules[{first_at[rule.rule_id]}])",
                )
            )
        else:
            first_at[rule.rule_id] = i
        for name in ("message", "field"):
            if "\x00" in getattr(rule, name):
                problems.append((f"{at}.{name}", "must not contain NUL characters"))
        if rule.scope is Scope.PLAN and "{index}" in rule.field:
            problems.append((f"{at}.field", "'{index}' is only replaced in STEP-scope rules"))
        if len(rule.expression) > MAX_EXPRESSION_LENGTH:
            problems.append((f"{at}.expression", f"at most {MAX_EXPRESSION_LENGTH} characters"))
            continue
        try:
            program = compile_program(rule.expression)
        except ExpressionError as exc:
            problems.append(
                (f"{at}.expression", str(exc) if rule.expression.strip() else "required")
            )
            continue
        allowed = STEP_VARIABLES if rule.scope is Scope.STEP else PLAN_VARIABLES
        unknown = sorted(free_variables(program, rule.expression) - allowed)
        if unknown:
            problems.append(
                (
                    f"{at}.expression",
                    f"unknown variable(s) {', '.join(unknown)}; {rule.scope.value} rules may use "
                    f"{', '.join(sorted(allowed))}",
                )
            )
            continue
        compiled.append(_CompiledRule(policy.policy_id, rule, program))
    return compiled, problems


def check_policy(policy: Policy) -> None:
    """Raises PolicyInvalid listing every problem of `policy` (ids, duplicate rule ids, empty
    expressions, syntax errors, unknown variables), each with its path in the policy."""
    _, problems = _compile_policy(policy)
    if problems:
        raise PolicyInvalid(problems)


def _variables(
    plan: Mapping[str, Any], context: EvaluationContext, rules: RuleSet
) -> dict[str, Any]:
    """The rules' variables, only those some rule reads, and of `plan` only the fields they
    select: converting values to CEL is most of an evaluation's cost (a plan of 10 targets:
    ~150 µs, two thirds of it its steps), and what no rule reads cannot change a verdict; a
    field left out reads as missing, as it would in the whole plan. `index` is always there
    (STEP rules' own)."""
    fields = rules.plan_fields
    variables = {
        "plan": plan if fields is None else {k: plan[k] for k in fields if k in plan},
        "fleet": {
            "size": context.fleet_size,
            "connected": context.connected_nodes,
            "cordoned": sorted(context.cordoned_nodes),
        },
        "history": {
            "recent": dict(context.recent_plans_by_target),
            "window_seconds": float(context.rate_window_s),
        },
        "now": context.now,
        "source": {**_NO_CALIBRATION, "name": plan.get("source", ""), **context.source},
        "breaker": {"tripped": False, "reason": "", **context.breaker},
    }
    chosen = {name: value for name, value in variables.items() if name in rules.variables}
    chosen["index"] = 0
    return chosen


def _violation(rule: _CompiledRule, field: str, why: str | None) -> Violation:
    message = rule.rule.message or f"rule {rule.rule.rule_id} is violated"
    if why is not None:
        # Fail closed: a rule that cannot be judged counts as violated, with its own effect.
        message = f"the rule could not be evaluated ({why}), so it counts as violated: {message}"
    return Violation(rule.rule.rule_id, message, field, rule.rule.effect, rule.policy_id)


def _run(rule: _CompiledRule, context: cel.Context, field: str) -> Violation | None:
    try:
        result = rule.program.execute(context)
    except Exception as exc:
        return _violation(rule, field, describe_error(exc))
    if result is True:
        return None
    if result is False:
        return _violation(rule, field, None)
    return _violation(rule, field, f"it gave {type(result).__name__} {_shown(result)}, not a bool")


def _shown(value: Any, limit: int = 200) -> str:
    """A result as a person reads it, the same every time: a map's keys in sorted order (the
    CEL library's maps iterate in hash order, which varies between evaluations), cut to
    `limit` characters."""

    def show(item: Any) -> str:
        if isinstance(item, Mapping):
            pairs = sorted((show(k), show(v)) for k, v in item.items())
            return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
        if isinstance(item, list | tuple):
            return "[" + ", ".join(show(v) for v in item) + "]"
        return repr(item)

    text = show(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PolicyEngine:
    """Holds the compiled enabled policies and judges plans against them."""

    def __init__(self, on_evaluated: Callable[[float, Verdict], None] | None = None) -> None:
        self._on_evaluated = on_evaluated
        # Replaced as a whole, so an evaluation sees either the old set or the new one.
        self._state: tuple[list[Policy], RuleSet] = ([], RuleSet())

    def replace_policies(self, policies: Iterable[Policy]) -> None:
        """Compiles all of `policies` and puts them in force at once; raises PolicyInvalid
        (naming the policy) and keeps the previous set when any is invalid."""
        ordered = sorted(policies, key=lambda p: p.policy_id)
        rules: list[_CompiledRule] = []
        for i, policy in enumerate(ordered):
            if i and ordered[i - 1].policy_id == policy.policy_id:
                raise PolicyInvalid(
                    [("policy_id", "given twice")], where=f"policy {policy.policy_id!r}"
                )
            compiled, problems = _compile_policy(policy)
            if problems:
                raise PolicyInvalid(problems, where=f"policy {policy.policy_id!r}")
            if policy.enabled:
                rules.extend(compiled)
        self._state = (ordered, _rule_set(rules))

    def policies(self) -> list[Policy]:
        """Every policy in force (disabled ones included), by policy id."""
        return list(self._state[0])

    def rules_in_force(self) -> RuleSet:
        """The enabled rules now; pass them to `evaluate` to judge by exactly these."""
        return self._state[1]

    @staticmethod
    def _run_all(
        rules: tuple[_CompiledRule, ...], cel_context: cel.Context, steps: list[Any]
    ) -> list[Violation]:
        found: list[list[Violation]] = [[] for _ in rules]
        for position, rule in enumerate(rules):
            if rule.rule.scope is Scope.PLAN and (
                violation := _run(rule, cel_context, rule.rule.field)
            ):
                found[position].append(violation)
        # Step by step rather than rule by rule: the library re-prepares its whole activation
        # on the first run after a variable changes (~60 µs for a plan of 100 nodes), so the
        # variables change once per step, not once per rule and step.
        step_rules = [(p, r) for p, r in enumerate(rules) if r.rule.scope is Scope.STEP]
        for index, step in enumerate(steps if step_rules else ()):
            cel_context.add_variable("step", step)
            cel_context.add_variable("index", index)
            for position, rule in step_rules:
                field = rule.rule.field.replace("{index}", str(index))
                if violation := _run(rule, cel_context, field):
                    found[position].append(violation)
        return [violation for per_rule in found for violation in per_rule]

    def evaluate(
        self, plan: Mapping[str, Any], context: EvaluationContext, rules: RuleSet | None = None
    ) -> Verdict:
        """Every violation of every enabled rule (of `rules`, by default those in force now),
        in policy-id, rule and step order."""
        started = time.perf_counter()
        in_force = rules if rules is not None else self._state[1]
        compiled = in_force.rules
        violations: list[Violation] = []
        try:
            cel_context = to_context(_variables(plan, context, in_force))
        except ExpressionError as exc:
            violations = [_violation(r, r.rule.field, str(exc)) for r in compiled]
        else:
            violations = self._run_all(compiled, cel_context, plan.get("steps") or [])
        verdict = Verdict(
            rejections=tuple(v for v in violations if v.effect is Effect.REJECT),
            approvals_required=tuple(v for v in violations if v.effect is Effect.REQUIRE_APPROVAL),
        )
        if self._on_evaluated is not None:
            try:
                self._on_evaluated(time.perf_counter() - started, verdict)
            except Exception:
                log.exception("policy evaluation hook failed")
        return verdict
