"""Policies plans are checked against: rules in CEL, loaded from YAML files and the store,
compiled once and evaluated deterministically by the policy engine."""

from controlplane.policy._book import (
    REFRESH_INTERVAL_S,
    PolicyAlreadyExists,
    PolicyBook,
    PolicyNotFound,
    PolicyReadOnly,
)
from controlplane.policy._cel import (
    Expression,
    ExpressionError,
    compile_expression,
    expression_problem,
)
from controlplane.policy._engine import ID_PATTERN, PolicyEngine, RuleSet, check_policy
from controlplane.policy._files import (
    AUTONOMY_FILE_NAME,
    load_policy_files,
    policy_from_data,
    policy_to_data,
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

__all__ = [
    "AUTONOMY_FILE_NAME",
    "ID_PATTERN",
    "REFRESH_INTERVAL_S",
    "Effect",
    "EvaluationContext",
    "Expression",
    "ExpressionError",
    "Policy",
    "PolicyAlreadyExists",
    "PolicyBook",
    "PolicyEngine",
    "PolicyInvalid",
    "PolicyNotFound",
    "PolicyReadOnly",
    "Rule",
    "RuleSet",
    "Scope",
    "Verdict",
    "Violation",
    "check_policy",
    "compile_expression",
    "expression_problem",
    "load_policy_files",
    "policy_from_data",
    "policy_to_data",
]
