"""Validation of objects before they are stored: the official JSON schemas (kubernetes-validate,
strict mode, Kubernetes 1.32) and the semantic rules of the API server that a client can trip on
(selectors matching templates, immutable fields, replicas, budgets)."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate

from tests.kubeapi._errors import Cause, RawValue, invalid
from tests.kubeapi._resources import ResourceType
from tests.kubeapi._selectors import LabelSelector, label_key_error, label_value_error

Obj = dict[str, Any]

SCHEMA_VERSION = "1.32"

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PERCENT_RE = re.compile(r"^[0-9]+%$")
_UNEXPECTED_RE = re.compile(r"\('([^']+)'")

SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS_1035_MESSAGE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)


def check_schema(
    rt: ResourceType, obj: Obj, *, kind: str | None = None, group: str | None = None
) -> None:
    """Validates `obj` against the 1.32 schema of its kind; 422 Invalid on the first error."""
    try:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        field = _field_path(list(error.absolute_path))
        if error.validator == "additionalProperties":
            unexpected = _UNEXPECTED_RE.search(error.message)
            if unexpected:
                field = f"{field}.{unexpected[1]}" if field else unexpected[1]
        name = str((obj.get("metadata") or {}).get("name", ""))
        raise invalid(
            rt, name, [Cause.schema(field, error.message)], kind=kind, group=group
        ) from None


def _field_path(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def check_create(rt: ResourceType, obj: Obj) -> None:
    causes = _metadata_causes(rt, obj) + _spec_causes(rt.kind, obj)
    _raise(rt, obj, causes)


def check_update(rt: ResourceType, old: Obj, new: Obj) -> None:
    causes = _metadata_causes(rt, new) + _spec_causes(rt.kind, new)
    causes += _immutability_causes(rt.kind, old, new)
    _raise(rt, new, causes)


def _raise(rt: ResourceType, obj: Obj, causes: list[Cause]) -> None:
    if causes:
        raise invalid(rt, str(obj.get("metadata", {}).get("name", "")), causes)


def name_causes(rt: ResourceType, name: str) -> list[Cause]:
    if rt.kind in ("Service", "Namespace"):
        pattern, message = (
            (_DNS_1035_RE, DNS_1035_MESSAGE)
            if rt.kind == "Service"
            else (_DNS_LABEL_RE, LABEL_MESSAGE)
        )
        if len(name) > 63:
            return [Cause.invalid("metadata.name", name, "must be no more than 63 characters")]
        if not pattern.match(name):
            return [Cause.invalid("metadata.name", name, message)]
        return []
    if len(name) > 253:
        return [Cause.invalid("metadata.name", name, "must be no more than 253 characters")]
    if not _DNS_SUBDOMAIN_RE.match(name):
        return [Cause.invalid("metadata.name", name, SUBDOMAIN_MESSAGE)]
    return []


def _metadata_causes(rt: ResourceType, obj: Obj) -> list[Cause]:
    metadata = obj.get("metadata") or {}
    causes = name_causes(rt, str(metadata.get("name", "")))
    causes += _label_causes("metadata.labels", metadata.get("labels"))
    return causes


def _label_causes(field: str, labels: Any) -> list[Cause]:
    causes = []
    for key, value in (labels or {}).items():
        key_error = label_key_error(key)
        if key_error:
            causes.append(Cause.invalid(field, key, key_error))
        value_error = label_value_error(str(value))
        if value_error:
            causes.append(Cause.invalid(field, value, value_error))
    return causes


def _spec_causes(kind: str, obj: Obj) -> list[Cause]:
    spec = obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet"):
        return _workload_causes(kind, spec)
    if kind == "PodDisruptionBudget":
        return _budget_causes(spec)
    if kind == "Pod":
        return _pod_spec_causes("spec", spec)
    if kind == "Service":
        return _service_causes(spec)
    return []


def _workload_causes(kind: str, spec: Obj) -> list[Cause]:
    causes: list[Cause] = []
    replicas = spec.get("replicas", 1)
    if isinstance(replicas, int) and replicas < 0:
        causes.append(
            Cause.invalid("spec.replicas", replicas, "must be greater than or equal to 0")
        )
    selector_object = spec.get("selector")
    selector = LabelSelector.from_object(selector_object or {})
    template = spec.get("template") or {}
    template_labels = (template.get("metadata") or {}).get("labels") or {}
    if selector.empty:
        causes.append(
            Cause.invalid(
                "spec.selector",
                _compact(selector_object),
                f"empty selector is invalid for {kind.lower()}",
            )
        )
    elif not selector.matches(template_labels):
        causes.append(
            Cause.invalid(
                "spec.template.metadata.labels",
                _compact(template_labels),
                "`selector` does not match template `labels`",
            )
        )
    causes += _label_causes("spec.template.metadata.labels", template_labels)
    pod_spec = template.get("spec") or {}
    restart = pod_spec.get("restartPolicy", "Always")
    if restart != "Always":
        causes.append(
            Cause(
                Cause.UNSUPPORTED,
                "spec.template.spec.restartPolicy",
                f'"{restart}": supported values: "Always"',
                show=False,
            )
        )
    causes += _pod_spec_causes("spec.template.spec", pod_spec)
    if kind == "Deployment":
        causes += _deployment_strategy_causes(spec)
    else:
        policy = spec.get("podManagementPolicy", "OrderedReady")
        if policy not in ("OrderedReady", "Parallel"):
            causes.append(
                Cause(
                    Cause.UNSUPPORTED,
                    "spec.podManagementPolicy",
                    f'"{policy}": supported values: "OrderedReady", "Parallel"',
                    show=False,
                )
            )
    return causes


def _deployment_strategy_causes(spec: Obj) -> list[Cause]:
    causes: list[Cause] = []
    strategy = spec.get("strategy") or {}
    kind = strategy.get("type", "RollingUpdate")
    rolling = strategy.get("rollingUpdate")
    if kind == "Recreate" and rolling is not None:
        causes.append(
            Cause.forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            )
        )
    elif kind == "RollingUpdate" and isinstance(rolling, dict):
        surge = rolling.get("maxSurge", "25%")
        unavailable = rolling.get("maxUnavailable", "25%")
        for field, value in (("maxSurge", surge), ("maxUnavailable", unavailable)):
            causes += _int_or_percent_causes(f"spec.strategy.rollingUpdate.{field}", value)
        if _is_zero(surge) and _is_zero(unavailable):
            causes.append(
                Cause.invalid(
                    "spec.strategy.rollingUpdate.maxUnavailable",
                    unavailable,
                    "may not be 0 when `maxSurge` is 0",
                )
            )
        if (
            isinstance(unavailable, str)
            and _PERCENT_RE.match(unavailable)
            and int(unavailable[:-1]) > 100
        ):
            causes.append(
                Cause.invalid(
                    "spec.strategy.rollingUpdate.maxUnavailable",
                    unavailable,
                    "must not be greater than 100%",
                )
            )
    elif kind not in ("RollingUpdate", "Recreate"):
        causes.append(
            Cause(
                Cause.UNSUPPORTED,
                "spec.strategy.type",
                f'"{kind}": supported values: "Recreate", "RollingUpdate"',
                show=False,
            )
        )
    deadline = spec.get("progressDeadlineSeconds")
    min_ready = spec.get("minReadySeconds", 0) or 0
    if isinstance(deadline, int) and deadline <= min_ready:
        causes.append(
            Cause.invalid(
                "spec.progressDeadlineSeconds", deadline, "must be greater than minReadySeconds"
            )
        )
    return causes


def _is_zero(value: Any) -> bool:
    return value in (0, "0", "0%")


def _int_or_percent_causes(field: str, value: Any) -> list[Cause]:
    if isinstance(value, int):
        if value < 0:
            return [Cause.invalid(field, value, "must be greater than or equal to 0")]
        return []
    if isinstance(value, str) and not _PERCENT_RE.match(value):
        return [
            Cause.invalid(
                field,
                value,
                "a valid percent string must be a numeric string followed by an ending '%' "
                "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')",
            )
        ]
    return []


def _pod_spec_causes(prefix: str, spec: Obj) -> list[Cause]:
    causes: list[Cause] = []
    containers = spec.get("containers") or []
    if not containers:
        causes.append(Cause.required(f"{prefix}.containers"))
    seen: set[str] = set()
    for field in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(field) or []):
            if not isinstance(container, dict):
                continue
            path = f"{prefix}.{field}[{index}]"
            name = str(container.get("name", ""))
            if not name:
                causes.append(Cause.required(f"{path}.name"))
            elif len(name) > 63 or not _DNS_LABEL_RE.match(name):
                causes.append(Cause.invalid(f"{path}.name", name, LABEL_MESSAGE))
            elif name in seen:
                causes.append(Cause.duplicate(f"{path}.name", name))
            seen.add(name)
            if not str(container.get("image", "")).strip():
                causes.append(Cause.required(f"{path}.image"))
    return causes


def _budget_causes(spec: Obj) -> list[Cause]:
    causes: list[Cause] = []
    if "minAvailable" in spec and "maxUnavailable" in spec:
        causes.append(
            Cause.invalid(
                "spec", _compact(spec), "minAvailable and maxUnavailable cannot be both set"
            )
        )
    for field in ("minAvailable", "maxUnavailable"):
        value = spec.get(field)
        if value is None:
            continue
        causes += _int_or_percent_causes(f"spec.{field}", value)
        if isinstance(value, str) and _PERCENT_RE.match(value) and int(value[:-1]) > 100:
            causes.append(Cause.invalid(f"spec.{field}", value, "must not be greater than 100%"))
    policy = spec.get("unhealthyPodEvictionPolicy")
    if policy is not None and policy not in ("IfHealthyBudget", "AlwaysAllow"):
        causes.append(
            Cause(
                Cause.UNSUPPORTED,
                "spec.unhealthyPodEvictionPolicy",
                f'"{policy}": supported values: "AlwaysAllow", "IfHealthyBudget"',
                show=False,
            )
        )
    return causes


def _service_causes(spec: Obj) -> list[Cause]:
    causes: list[Cause] = []
    kind = spec.get("type", "ClusterIP")
    ports = spec.get("ports") or []
    if kind == "ExternalName":
        if not spec.get("externalName"):
            causes.append(Cause.required("spec.externalName"))
        return causes
    if not ports and spec.get("clusterIP") != "None":
        causes.append(Cause.required("spec.ports"))
    names: set[str] = set()
    for index, port in enumerate(ports):
        name = port.get("name", "")
        if len(ports) > 1 and not name:
            causes.append(Cause.required(f"spec.ports[{index}].name"))
        elif name and name in names:
            causes.append(Cause.duplicate(f"spec.ports[{index}].name", name))
        names.add(name)
    return causes


_STATEFULSET_MUTABLE = {
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
}
_POD_UPDATE_MESSAGE = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only "
    "additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set "
    "to 1 if it was previously negative)"
)


def _immutability_causes(kind: str, old: Obj, new: Obj) -> list[Cause]:
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    if kind == "Deployment" and old_spec.get("selector") != new_spec.get("selector"):
        return [
            Cause.invalid("spec.selector", _compact(new_spec.get("selector")), "field is immutable")
        ]
    if kind == "StatefulSet":
        frozen_old = {k: v for k, v in old_spec.items() if k not in _STATEFULSET_MUTABLE}
        frozen_new = {k: v for k, v in new_spec.items() if k not in _STATEFULSET_MUTABLE}
        if frozen_old != frozen_new:
            return [
                Cause.forbidden(
                    "spec",
                    "updates to statefulset spec for fields other than 'replicas', 'ordinals', "
                    "'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and "
                    "'minReadySeconds' are forbidden",
                )
            ]
    if kind == "Pod" and _pod_frozen(old_spec) != _pod_frozen(new_spec):
        return [Cause.forbidden("spec", _POD_UPDATE_MESSAGE)]
    if kind == "Service":
        old_ip, new_ip = old_spec.get("clusterIP"), new_spec.get("clusterIP")
        if old_ip and old_ip != new_ip:
            return [Cause.invalid("spec.clusterIP", new_ip, "field is immutable")]
    return []


def _pod_frozen(spec: Obj) -> Obj:
    frozen = json.loads(json.dumps(spec))
    for field in ("containers", "initContainers"):
        for container in frozen.get(field) or []:
            container.pop("image", None)
    for field in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
        frozen.pop(field, None)
    return dict(frozen)


def _compact(value: Any) -> RawValue:
    return RawValue(json.dumps(value, separators=(",", ":"), sort_keys=True))
