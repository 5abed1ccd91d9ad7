"""Policies as data: the dictionary form (YAML files, the store's JSON rows) and loading the
YAML files named by `policy_paths`."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from controlplane.policy._engine import check_policy
from controlplane.policy._model import Effect, Policy, PolicyInvalid, Rule, Scope

_POLICY_FIELDS = ("policy_id", "description", "enabled", "rules")
_RULE_FIELDS = ("rule_id", "expression", "message", "field", "effect", "scope")


def _text(data: dict[str, Any], key: str, at: str, problems: list[tuple[str, str]]) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append((f"{at}{key}", f"must be a string, got {type(value).__name__}"))
        return ""
    return value


def _choice(
    data: dict[str, Any],
    key: str,
    kind: type[Effect] | type[Scope],
    at: str,
    problems: list[tuple[str, str]],
) -> Any:
    raw = data.get(key)
    if raw is None or raw == "":
        return next(iter(kind))
    if isinstance(raw, str) and raw.upper() in kind.__members__:
        return kind[raw.upper()]
    problems.append((f"{at}{key}", f"must be one of {', '.join(kind.__members__)}, got {raw!r}"))
    return next(iter(kind))


def _unknown(
    data: dict[str, Any], known: tuple[str, ...], at: str, problems: list[tuple[str, str]]
) -> None:
    for key in data:
        if key not in known:
            problems.append((f"{at}{key}", f"unknown field; known: {', '.join(known)}"))


def policy_from_data(data: Any, origin: str = "api") -> Policy:
    """A Policy from its dictionary form; raises PolicyInvalid listing every problem, shape
    and CEL alike, with paths relative to the policy."""
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise PolicyInvalid([("", f"a policy must be a mapping, got {type(data).__name__}")])
    _unknown(data, _POLICY_FIELDS, "", problems)
    policy_id = _text(data, "policy_id", "", problems)
    description = _text(data, "description", "", problems)
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.append(("enabled", f"must be true or false, got {enabled!r}"))
        enabled = True
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        problems.append(("rules", f"must be a list of rules, got {type(raw_rules).__name__}"))
        raw_rules = []
    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules):
        at = f"rules[{i}]."
        if not isinstance(raw, dict):
            problems.append((f"rules[{i}]", f"must be a mapping, got {type(raw).__name__}"))
            continue
        _unknown(raw, _RULE_FIELDS, at, problems)
        rules.append(
            Rule(
                rule_id=_text(raw, "rule_id", at, problems),
                expression=_text(raw, "expression", at, problems),
                message=_text(raw, "message", at, problems),
                field=_text(raw, "field", at, problems),
                effect=_choice(raw, "effect", Effect, at, problems),
                scope=_choice(raw, "scope", Scope, at, problems),
            )
        )
    policy = Policy(policy_id, description, tuple(rules), enabled, origin)
    try:
        check_policy(policy)
    except PolicyInvalid as exc:
        problems.extend(p for p in exc.problems if p not in problems)
    if problems:
        raise PolicyInvalid(problems)
    return policy


def rule_to_data(rule: Rule) -> dict[str, Any]:
    return {
        "rule_id": rule.rule_id,
        "expression": rule.expression,
        "message": rule.message,
        "field": rule.field,
        "effect": rule.effect.value,
        "scope": rule.scope.value,
    }


def policy_to_data(policy: Policy) -> dict[str, Any]:
    """The dictionary form of `policy` (what a YAML file holds)."""
    return {
        "policy_id": policy.policy_id,
        "description": policy.description,
        "enabled": policy.enabled,
        "rules": [rule_to_data(r) for r in policy.rules],
    }


AUTONOMY_FILE_NAME = "autonomy.yaml"
"""In a policy directory, the autonomy guards' thresholds (breaker, disruption budgets), not a
policy: `controlplane.autonomy.load_autonomy_file` reads it."""


def _files_of(paths: str) -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for entry in (p.strip() for p in paths.split(",")):
        if not entry:
            continue
        path = pathlib.Path(entry)
        if path.is_dir():
            files.extend(
                sorted(
                    f
                    for f in path.iterdir()
                    if f.suffix in (".yaml", ".yml")
                    and f.is_file()
                    and f.name != AUTONOMY_FILE_NAME
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"policy_paths: {entry}: no such file or directory")
    return files


def _load_file(path: pathlib.Path) -> list[Policy]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if document is None:
        return []
    items = document if isinstance(document, list) else [document]
    policies: list[Policy] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        prefix = f"[{i}]" if isinstance(document, list) else ""
        try:
            policies.append(policy_from_data(item, origin=f"file:{path}"))
        except PolicyInvalid as exc:
            problems.extend(
                (f"{prefix}.{p}" if prefix and p else p or prefix, m) for p, m in exc.problems
            )
    if problems:
        raise PolicyInvalid(problems, where=str(path))
    return policies


def load_policy_files(paths: str) -> list[Policy]:
    """Policies from comma-separated YAML files or directories of *.yaml / *.yml (sorted);
    each file holds one policy or a list. Raises ValueError (PolicyInvalid for a bad policy)
    naming the file and the field path."""
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    for path in _files_of(paths):
        for policy in _load_file(path):
            if policy.policy_id in seen:
                raise ValueError(
                    f"{path}: policy_id {policy.policy_id!r} is also defined in "
                    f"{seen[policy.policy_id]}"
                )
            seen[policy.policy_id] = str(path)
            policies.append(policy)
    return policies
