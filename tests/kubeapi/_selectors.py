"""Label and field selectors: the query-string syntax (`app=web,tier in (a,b),!canary`), the
`LabelSelector` objects of Deployments and PodDisruptionBudgets, and label syntax checks."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

Obj = dict[str, Any]

_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)"
_NAME_RE = re.compile(f"^{_NAME}$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SET_RE = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")


def label_key_error(key: str) -> str | None:
    """Why `key` is not a valid label key, or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _NAME_RE.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
            "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if value == "":
        return None
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _NAME_RE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  "
            "or 'my_value',  or '12345', regex used for validation is "
            "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One term of a label selector."""

    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "=":
            return present and value in self.values
        if self.operator == "!=":
            return not present or value not in self.values
        if self.operator == "in":
            return present and value in self.values
        if self.operator == "notin":
            return not present or value not in self.values
        if self.operator == "exists":
            return present
        return not present


class LabelSelector:
    """A parsed label selector; `None` requirements mean "matches nothing" (a nil selector)."""

    def __init__(self, requirements: list[Requirement] | None) -> None:
        self.requirements = requirements

    @classmethod
    def everything(cls) -> LabelSelector:
        return cls([])

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parses the query-string syntax; ValueError with the API server's wording."""
        requirements = [_parse_requirement(term) for term in _split_terms(text)]
        return cls(requirements)

    @classmethod
    def from_object(cls, selector: Obj | None) -> LabelSelector:
        """From a `LabelSelector` object (`matchLabels`, `matchExpressions`)."""
        if selector is None:
            return cls(None)
        requirements = [
            Requirement(key, "=", frozenset([value]))
            for key, value in sorted((selector.get("matchLabels") or {}).items())
        ]
        operators = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
        for expression in selector.get("matchExpressions") or []:
            operator = operators.get(expression.get("operator", ""))
            if operator is None:
                raise ValueError(
                    f"{expression.get('operator')!r} is not a valid pod selector operator"
                )
            requirements.append(
                Requirement(expression["key"], operator, frozenset(expression.get("values") or []))
            )
        return cls(requirements)

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.requirements is None:
            return False
        labels = labels or {}
        return all(requirement.matches(labels) for requirement in self.requirements)

    @property
    def empty(self) -> bool:
        return self.requirements is not None and not self.requirements

    def __str__(self) -> str:
        terms = []
        for requirement in self.requirements or []:
            values = sorted(requirement.values)
            if requirement.operator in ("=", "!="):
                terms.append(f"{requirement.key}{requirement.operator}{values[0]}")
            elif requirement.operator in ("in", "notin"):
                terms.append(f"{requirement.key} {requirement.operator} ({','.join(values)})")
            elif requirement.operator == "exists":
                terms.append(requirement.key)
            else:
                terms.append(f"!{requirement.key}")
        return ",".join(terms)


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


def _parse_requirement(term: str) -> Requirement:
    match = _SET_RE.match(term)
    if match:
        values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
        if not values:
            raise ValueError(
                "unable to parse requirement: for 'in', 'notin' operators, values set can't be "
                f"empty: {term}"
            )
        requirement = Requirement(match["key"], match["op"], values)
    elif term.startswith("!"):
        requirement = Requirement(term[1:].strip(), "!")
    else:
        for operator, spelled in (("!=", "!="), ("=", "=="), ("=", "=")):
            key, found, value = term.partition(spelled)
            if found:
                requirement = Requirement(key.strip(), operator, frozenset([value.strip()]))
                break
        else:
            requirement = Requirement(term, "exists")
    key_error = label_key_error(requirement.key)
    if key_error:
        raise ValueError(
            f'unable to parse requirement: invalid label key "{requirement.key}": {key_error}'
        )
    for value in requirement.values:
        value_error = label_value_error(value)
        if value_error:
            raise ValueError(
                f'unable to parse requirement: invalid label value: "{value}": at key: '
                f'"{requirement.key}": {value_error}'
            )
    return requirement


class FieldSelector:
    """A parsed field selector (`metadata.name=x,spec.nodeName!=y`)."""

    def __init__(self, terms: list[tuple[str, bool, str]]) -> None:
        self.terms = terms  # (field, equal, value)

    @classmethod
    def parse(cls, text: str, allowed: tuple[str, ...]) -> FieldSelector:
        terms = []
        for term in _split_terms(text):
            for spelled, equal in (("!=", False), ("==", True), ("=", True)):  # noqa: B007
                field, found, value = term.partition(spelled)
                if found:
                    break
            else:
                raise ValueError(f"invalid selector: '{text}'; can't understand '{term}'")
            field = field.strip()
            if field not in ("metadata.name", "metadata.namespace", *allowed):
                raise ValueError(f"field label not supported: {field}")
            terms.append((field, equal, value.strip()))
        return cls(terms)

    def matches(self, obj: Obj) -> bool:
        return all(
            (field_value(obj, field) == value) == equal for field, equal, value in self.terms
        )

    def name(self) -> str | None:
        """The single object name this selector pins, if any (`metadata.name=x`)."""
        names = [v for f, equal, v in self.terms if f == "metadata.name" and equal]
        return names[0] if len(names) == 1 else None


def field_value(obj: Obj, field: str) -> str:
    current: Any = obj
    for part in field.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    if isinstance(current, bool):
        return "true" if current else "false"
    if current is None:
        return "false" if field in ("spec.unschedulable", "spec.hostNetwork") else ""
    return str(current)
