"""Plans and policies as people write them, in YAML or JSON files, turned into API messages:
plans in the `sentinel.v1.Plan` shape (snake_case or camelCase field names, durations like
"30s"), policies in the shape of `deploy/policies/*.yaml` (scope STEP, effect REJECT, ...)."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import yaml
from google.protobuf import json_format
from sentinel.v1 import plan_pb2, policy_pb2


class DocumentError(ValueError):
    """A plan or policy file that cannot be read or is not the message it should hold."""


def read_document(path: pathlib.Path | str) -> Any:
    """The data of a YAML or JSON file (`-` reads stdin); JSON by a .json suffix, else YAML
    (which also reads JSON)."""
    name = str(path)
    try:
        text = sys.stdin.read() if name == "-" else pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{name}: cannot read: {exc}") from None
    try:
        if name.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if name.endswith(".json") else "YAML"
        raise DocumentError(f"{name}: not valid {kind}: {exc}") from None


def _plain(value: Any) -> Any:
    """YAML reads unquoted times as datetimes; the JSON mapping of Timestamp wants RFC 3339."""
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return moment.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat() + "T00:00:00Z"
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def plan_from_data(data: Any, where: str = "plan") -> plan_pb2.Plan:
    """The Plan message a mapping describes; DocumentError names the field it cannot read."""
    if not isinstance(data, Mapping):
        raise DocumentError(
            f"{where}: not a sentinel.v1.Plan: expected a mapping, got {type(data).__name__}"
        )
    try:
        return json_format.ParseDict(_plain(data), plan_pb2.Plan())
    except json_format.ParseError as exc:
        raise DocumentError(f"{where}: not a sentinel.v1.Plan: {exc}") from None


def load_plan(path: pathlib.Path | str) -> plan_pb2.Plan:
    """The plan in a YAML or JSON file."""
    return plan_from_data(read_document(path), str(path))


_SHORT_ENUMS = {
    "scope": "POLICY_RULE_SCOPE_",
    "effect": "POLICY_EFFECT_",
}


def policy_from_data(data: Any, where: str = "policy") -> policy_pb2.Policy:
    """The Policy message a mapping describes, as a policy file writes it: `scope: STEP`,
    `effect: REQUIRE_APPROVAL` (the full enum names work too), `enabled` true unless said."""
    if not isinstance(data, Mapping):
        raise DocumentError(f"{where}: a policy must be a mapping, got {type(data).__name__}")
    normal = dict(_plain(data))
    normal.setdefault("enabled", True)
    rules = normal.get("rules")
    if isinstance(rules, list):
        normal["rules"] = [_rule(rule) for rule in rules]
    try:
        return json_format.ParseDict(normal, policy_pb2.Policy())
    except json_format.ParseError as exc:
        raise DocumentError(f"{where}: not a sentinel.v1.Policy: {exc}") from None


def _rule(rule: Any) -> Any:
    if not isinstance(rule, Mapping):
        return rule
    out = dict(rule)
    for key, prefix in _SHORT_ENUMS.items():
        value = out.get(key)
        if isinstance(value, str) and value and not value.upper().startswith(prefix):
            out[key] = prefix + value.upper()
    return out


def load_policies(path: pathlib.Path | str) -> list[policy_pb2.Policy]:
    """The policies in a YAML or JSON file: one policy, or a list of them."""
    data = read_document(path)
    if data is None:
        return []
    if isinstance(data, list):
        return [policy_from_data(item, f"{path}[{i}]") for i, item in enumerate(data)]
    return [policy_from_data(data, str(path))]
