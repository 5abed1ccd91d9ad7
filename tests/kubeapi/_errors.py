"""API errors as the Kubernetes API server reports them: `kind: Status` bodies with the code,
reason, message and details a client decodes."""

from __future__ import annotations

from typing import Any

from tests.kubeapi._resources import ResourceType

Obj = dict[str, Any]

CONFLICT_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
PDB_VIOLATION_MESSAGE = "Cannot evict pod as it would violate the pod's disruption budget."


class ApiError(Exception):
    """A refusal carried back to the client as a `Status` with an HTTP code."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Obj | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def success_status(code: int = 200, details: Obj | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _details(rt: ResourceType, name: str, *, kind: str | None = None, **extra: Any) -> Obj:
    details: Obj = {"name": name} if name else {}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = kind if kind is not None else rt.plural
    details.update(extra)
    return details


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name)
    )


def conflict(rt: ResourceType, name: str, why: str = CONFLICT_MESSAGE) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}',
        _details(rt, name),
    )


class Cause:
    """One field error of an Invalid status (`details.causes[]`)."""

    # Types as the API server names them (field.ErrorType).
    INVALID = ("FieldValueInvalid", "Invalid value")
    REQUIRED = ("FieldValueRequired", "Required value")
    FORBIDDEN = ("FieldValueForbidden", "Forbidden")
    UNSUPPORTED = ("FieldValueNotSupported", "Unsupported value")
    DUPLICATE = ("FieldValueDuplicate", "Duplicate value")
    UNKNOWN = ("FieldValueTypeInvalid", "Invalid value")

    def __init__(
        self, kind: tuple[str, str], field: str, detail: str, value: Any = None, *, show: bool
    ) -> None:
        self.reason, label = kind
        self.field = field
        if kind in (Cause.INVALID, Cause.UNKNOWN) and show:
            self.message = f"{label}: {_go_value(value)}: {detail}"
        elif detail:
            self.message = f"{label}: {detail}" if label else detail
        else:
            self.message = label

    @classmethod
    def invalid(cls, field: str, value: Any, detail: str) -> Cause:
        return cls(cls.INVALID, field, detail, value, show=True)

    @classmethod
    def required(cls, field: str, detail: str = "") -> Cause:
        return cls(cls.REQUIRED, field, detail, show=False)

    @classmethod
    def forbidden(cls, field: str, detail: str) -> Cause:
        return cls(cls.FORBIDDEN, field, detail, show=False)

    @classmethod
    def duplicate(cls, field: str, value: Any) -> Cause:
        return cls(cls.DUPLICATE, field, "", value, show=False)

    @classmethod
    def schema(cls, field: str, detail: str) -> Cause:
        return cls(("FieldValueInvalid", ""), field, detail, show=False)

    def text(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class RawValue(str):
    """A value shown as is in a cause (a structure already rendered), not quoted."""


def _go_value(value: Any) -> str:
    if isinstance(value, RawValue):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def invalid(
    rt: ResourceType,
    name: str,
    causes: list[Cause],
    *,
    kind: str | None = None,
    group: str | None = None,
) -> ApiError:
    """422 Invalid; `kind`/`group` name another type than `rt` (a Scale of a Deployment)."""
    kind = kind or rt.kind
    group = rt.group if group is None else group
    group_kind = f"{kind}.{group}" if group else kind
    texts = [cause.text() for cause in causes]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: Obj = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [
        {"reason": cause.reason, "message": cause.message, "field": cause.field} for cause in causes
    ]
    return ApiError(422, "Invalid", f'{group_kind} "{name}" is invalid: {summary}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed() -> ApiError:
    return ApiError(
        405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
    )


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format ({content_type or 'none'}) - accepted "
        "media types include: application/json-patch+json, application/merge-patch+json, "
        "application/strategic-merge-patch+json",
    )


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def forbidden(
    rt: ResourceType,
    verb: str,
    resource: str,
    user: str,
    namespace: str | None,
    name: str | None,
) -> ApiError:
    subject = f'{rt.qualified} "{name}"' if name else rt.qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
        f'in API group "{rt.group}" {scope}'
    )
    return ApiError(403, "Forbidden", message, _details(rt, name or ""))


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def too_many_requests(message: str, causes: list[Obj]) -> ApiError:
    return ApiError(429, "TooManyRequests", message, {"causes": causes})
