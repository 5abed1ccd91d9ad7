"""What the clients return besides API messages, and the request shapes both clients share."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2
from sentinel.v1 import audit_pb2, auth_pb2, plan_pb2

from sentinelclient._documents import plan_from_data

TERMINAL_PHASES = frozenset(
    {
        plan_pb2.PLAN_PHASE_REJECTED,
        plan_pb2.PLAN_PHASE_COMPLETED,
        plan_pb2.PLAN_PHASE_FAILED,
        plan_pb2.PLAN_PHASE_ROLLED_BACK,
        plan_pb2.PLAN_PHASE_CANCELLED,
    }
)
"""Phases a plan never leaves."""

POLICY_FIELDS = ("description", "rules", "enabled")
"""What UpdatePolicy may change."""


@dataclasses.dataclass(frozen=True)
class PlanUpdate:
    """One message of a plan watch: the plan as it is now and, when a transition caused the
    update, that transition (None for the first update and for step progress)."""

    plan: plan_pb2.Plan
    transition: plan_pb2.PlanTransition | None

    @property
    def terminal(self) -> bool:
        """The plan reached a phase it never leaves."""
        return self.plan.phase in TERMINAL_PHASES


def plan_update(response: plan_pb2.WatchPlanResponse) -> PlanUpdate:
    transition = response.transition if response.HasField("transition") else None
    return PlanUpdate(response.plan, transition)


def submit_request(
    plan: plan_pb2.Plan | Mapping[str, Any], request_id: str | None, validate_only: bool
) -> plan_pb2.SubmitPlanRequest:
    """The request, with the request id every attempt of this submission will carry: the one
    given, else the plan's own, else a new one (none for a dry run, which stores nothing)."""
    message = plan if isinstance(plan, plan_pb2.Plan) else plan_from_data(plan)
    key = request_id or message.request_id
    if not key and not validate_only:
        key = new_request_id()
    return plan_pb2.SubmitPlanRequest(plan=message, request_id=key, validate_only=validate_only)


def list_plans_request(
    phase: plan_pb2.PlanPhase.ValueType | None, source: str, target: str, page_size: int
) -> plan_pb2.ListPlansRequest:
    request = plan_pb2.ListPlansRequest(source=source, target=target, page_size=page_size)
    if phase is not None:
        request.phase = phase
    return request


def audit_request(
    principal: str,
    method: str,
    target: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    page_size: int,
) -> audit_pb2.ListAuditEventsRequest:
    request = audit_pb2.ListAuditEventsRequest(
        principal=principal, method=method, target=target, page_size=page_size
    )
    if since is not None:
        request.start_time.FromDatetime(since)
    if until is not None:
        request.end_time.FromDatetime(until)
    return request


def ttl(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def new_request_id() -> str:
    """A fresh idempotency key, sent unchanged on every attempt of one mutation."""
    return f"client-{uuid.uuid4().hex}"


class TokenState:
    """The bearer token calls carry and, after a login, the refresh token that renews it."""

    # Renew this long before the access token expires, so no call is sent with a dying one.
    _RENEW_BEFORE = dt.timedelta(seconds=60)

    def __init__(self, access_token: str) -> None:
        self.access_token = access_token
        self.refresh_token = ""
        self.access_expires: dt.datetime | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.access_token:
            return ()
        return (("authorization", f"Bearer {self.access_token}"),)

    def due_for_refresh(self) -> bool:
        return (
            bool(self.refresh_token)
            and self.access_expires is not None
            and self.access_expires - dt.datetime.now(dt.UTC) < self._RENEW_BEFORE
        )

    def store(self, pair: auth_pb2.LoginResponse | auth_pb2.RefreshResponse) -> None:
        self.access_token = pair.access_token
        self.refresh_token = pair.refresh_token
        self.access_expires = pair.access_token_expire_time.ToDatetime(dt.UTC)
