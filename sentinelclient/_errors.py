"""One exception for every refused or failed call: the gRPC status code, the server's message
and, for bad input, the field paths it named."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import grpc

# "plan.steps[1].parameters.watts: must be ..." -- a path is dotted names with [indexes].
_PROBLEM = re.compile(r"^(?P<field>[A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*): (?P<message>.+)$")
_RETRY_AFTER = "retry-after-ms"


@dataclasses.dataclass(frozen=True)
class FieldProblem:
    """One problem the server found in a request, at the field it concerns."""

    field: str
    message: str


def _nested(field: str) -> bool:
    return "." in field or "[" in field


def field_problems(message: str) -> tuple[FieldProblem, ...]:
    """The `path: problem; path: problem` parts of a status message. A part that names no
    path, or a bare word where the message's paths are nested ("...; supported: a, b"), is
    the rest of the problem before it (whose message itself contained '; ')."""
    problems: list[FieldProblem] = []
    for part in message.split("; "):
        match = _PROBLEM.match(part)
        if match is not None and (
            not problems or _nested(match["field"]) or not _nested(problems[0].field)
        ):
            problems.append(FieldProblem(match["field"], match["message"]))
        elif problems:
            last = problems.pop()
            problems.append(FieldProblem(last.field, f"{last.message}; {part}"))
    return tuple(problems)


class SentinelError(Exception):
    """A call the control plane refused or could not answer, with its status code, the
    server's message and the field paths that message names."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        method: str = "",
        retry_after_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        """The gRPC status code, e.g. grpc.StatusCode.INVALID_ARGUMENT."""
        self.message = message
        """The server's message as sent."""
        self.method = method
        """The RPC, e.g. PlanService/SubmitPlan."""
        self.retry_after_s = retry_after_s
        """The delay the server asked for before another try (`retry-after-ms`), if any."""
        self.attempts = attempts
        """Attempts made before giving up."""
        self.problems = field_problems(message)
        """Each `field: message` the status message lists (bad input names its fields)."""


def retry_after_s(call: Any) -> float | None:
    """The server's `retry-after-ms` trailer in seconds, None without a valid one."""
    try:
        trailers = call.trailing_metadata() or ()
    except Exception:  # a call that never reached a server has none to give
        return None
    for key, value in trailers:
        if key == _RETRY_AFTER:
            try:
                milliseconds = float(value)
            except (TypeError, ValueError):
                return None
            return milliseconds / 1000 if milliseconds >= 0 else None
    return None


def error_from_rpc(exc: grpc.RpcError, method: str, attempts: int = 1) -> SentinelError:
    """The SentinelError of a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    call: Any = exc
    code = call.code() if callable(getattr(call, "code", None)) else grpc.StatusCode.UNKNOWN
    details = call.details() if callable(getattr(call, "details", None)) else str(exc)
    return SentinelError(
        code,
        details or "",
        method=method,
        retry_after_s=retry_after_s(call),
        attempts=attempts,
    )
