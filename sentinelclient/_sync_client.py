"""SentinelClient: the public API over one blocking gRPC channel (no event loop), with bearer
tokens, retries of calls that are safe to repeat, paging followed, and errors as
SentinelError."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

import grpc
from sentinel.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    autonomy_pb2,
    autonomy_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

from sentinelclient import _values
from sentinelclient._channel import sync_channel
from sentinelclient._errors import error_from_rpc
from sentinelclient._retry import Backoff
from sentinelclient._settings import ConnectionSettings
from sentinelclient._values import PlanUpdate

log = logging.getLogger("sentinelclient")


class SentinelClient:
    """Calls a control plane's API from blocking code over one mutual-TLS channel; safe to
    share between threads.

    Use it as `with SentinelClient(settings) as client:`. Unary calls have a
    deadline per attempt (`settings.timeout_s`); reads, dry runs, `submit_plan` and
    `create_policy` (idempotent by request id) are retried by `settings.retry`.
    """

    def __init__(
        self,
        settings: ConnectionSettings | None = None,
        *,
        channel: grpc.Channel | None = None,
    ) -> None:
        """Reads the TLS files and token file now (small files, once); connects lazily."""
        self.settings = settings or ConnectionSettings.from_environment()
        self._channel = channel or sync_channel(self.settings)
        self._tokens = _values.TokenState(self.settings.bearer_token())
        self._token_lock = threading.Lock()
        self._plans = plan_pb2_grpc.PlanServiceStub(self._channel)
        self._fleet = fleet_pb2_grpc.FleetServiceStub(self._channel)
        self._telemetry = telemetry_pb2_grpc.TelemetryServiceStub(self._channel)
        self._policies = policy_pb2_grpc.PolicyServiceStub(self._channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self._channel)
        self._auth = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._identity = identity_pb2_grpc.IdentityServiceStub(self._channel)
        self._enrollment = enrollment_pb2_grpc.EnrollmentServiceStub(self._channel)
        self._autonomy = autonomy_pb2_grpc.AutonomyServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight end CANCELLED."""
        self._channel.close()

    # --- the machinery ----------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._tokens.due_for_refresh():
            with self._token_lock:
                if self._tokens.due_for_refresh():
                    self.refresh()
        return self._tokens.metadata()

    def _call(self, method: Any, request: Any, name: str, *, retry: bool = False) -> Any:
        """One unary call; with `retry`, repeated while the retry policy allows."""
        backoff = Backoff(self.settings.retry)
        while True:
            metadata = () if name.startswith("AuthService/") else self._metadata()
            try:
                return method(request, timeout=self.settings.timeout_s, metadata=metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, name, backoff.attempts + 1)
                delay = backoff.delay_after(error) if retry else None
                if delay is None:
                    raise error from exc
                log.info(
                    "%s failed (%s: %s); attempt %d in %.2f s",
                    name,
                    error.code.name,
                    error.message,
                    backoff.attempts + 1,
                    delay,
                )
                time.sleep(delay)

    def _all_pages(
        self, method: Any, request: Any, name: str, field: str, limit: int | None = None
    ) -> list[Any]:
        items: list[Any] = []
        while limit is None or len(items) < limit:
            response = self._call(method, request, name, retry=True)
            items.extend(getattr(response, field))
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        return items if limit is None else items[:limit]

    def _stream(self, method: Any, request: Any, name: str) -> Iterator[Any]:
        call = method(request, metadata=self._metadata())
        try:
            yield from call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, name) from exc
        finally:
            call.cancel()

    # --- logging in -------------------------------------------------------------------------

    def login(self, username: str, password: str) -> auth_pb2.LoginResponse:
        """Logs a password user in; later calls run as that user, and the access token is
        renewed with the refresh token before it expires. A rate-limited login waits for the
        delay the server names and tries again."""
        request = auth_pb2.LoginRequest(username=username, password=password)
        response: auth_pb2.LoginResponse = self._call(
            self._auth.Login, request, "AuthService/Login", retry=True
        )
        self._tokens.store(response)
        return response

    def refresh(self) -> auth_pb2.RefreshResponse:
        """Trades the refresh token of the last login for a new token pair."""
        request = auth_pb2.RefreshRequest(refresh_token=self._tokens.refresh_token)
        response: auth_pb2.RefreshResponse = self._call(
            self._auth.Refresh, request, "AuthService/Refresh"
        )
        self._tokens.store(response)
        return response

    # --- plans ------------------------------------------------------------------------------

    def submit_plan(
        self,
        plan: plan_pb2.Plan | Mapping[str, Any],
        *,
        request_id: str | None = None,
        validate_only: bool = False,
    ) -> plan_pb2.SubmitPlanResponse:
        """Submits a plan (a message, or a mapping in its JSON shape). Retried with one request
        id on every attempt: the given one, the plan's, or a new one; the server returns the
        stored plan (`replayed`) for a repeated id, so a retry never makes a second plan."""
        request = _values.submit_request(plan, request_id, validate_only)
        response: plan_pb2.SubmitPlanResponse = self._call(
            self._plans.SubmitPlan, request, "PlanService/SubmitPlan", retry=True
        )
        return response

    def validate_plan(self, plan: plan_pb2.Plan | Mapping[str, Any]) -> plan_pb2.SubmitPlanResponse:
        """The verdict, preview and dry-run changes of a plan, storing nothing."""
        return self.submit_plan(plan, validate_only=True)

    def get_plan(self, plan_id: str) -> plan_pb2.Plan:
        response = self._call(
            self._plans.GetPlan,
            plan_pb2.GetPlanRequest(plan_id=plan_id),
            "PlanService/GetPlan",
            retry=True,
        )
        plan: plan_pb2.Plan = response.plan
        return plan

    def list_plans(
        self,
        *,
        phase: plan_pb2.PlanPhase.ValueType | None = None,
        source: str = "",
        target: str = "",
        page_size: int = 0,
    ) -> list[plan_pb2.Plan]:
        """Every matching plan, oldest first, all pages."""
        request = _values.list_plans_request(phase, source, target, page_size)
        return self._all_pages(self._plans.ListPlans, request, "PlanService/ListPlans", "plans")

    def watch_plan(self, plan_id: str) -> Iterator[PlanUpdate]:
        """The plan as it is, then one update per transition (in order) or step change, until
        the plan is terminal. A dropped connection raises SentinelError(UNAVAILABLE); watching
        again starts from the plan as it is then."""
        request = plan_pb2.WatchPlanRequest(plan_id=plan_id)
        for response in self._stream(self._plans.WatchPlan, request, "PlanService/WatchPlan"):
            yield _values.plan_update(response)

    def wait_for_plan(self, plan_id: str) -> plan_pb2.Plan:
        """The plan once it is terminal."""
        for update in self.watch_plan(plan_id):
            if update.terminal:
                return update.plan
        return self.get_plan(plan_id)

    def approve_plan(self, plan_id: str, reason: str = "") -> plan_pb2.Plan:
        response = self._call(
            self._plans.ApprovePlan,
            plan_pb2.ApprovePlanRequest(plan_id=plan_id, reason=reason),
            "PlanService/ApprovePlan",
        )
        plan: plan_pb2.Plan = response.plan
        return plan

    def cancel_plan(self, plan_id: str, reason: str = "") -> plan_pb2.Plan:
        response = self._call(
            self._plans.CancelPlan,
            plan_pb2.CancelPlanRequest(plan_id=plan_id, reason=reason),
            "PlanService/CancelPlan",
        )
        plan: plan_pb2.Plan = response.plan
        return plan

    def get_plan_outcome(self, plan_id: str) -> plan_pb2.PlanOutcome:
        """What a plan did: per target, telemetry before its first step and after its last,
        the prediction verdicts and the time to effect (docs/safe-autonomy.md)."""
        response = self._call(
            self._plans.GetPlanOutcome,
            plan_pb2.GetPlanOutcomeRequest(plan_id=plan_id),
            "PlanService/GetPlanOutcome",
            retry=True,
        )
        outcome: plan_pb2.PlanOutcome = response.outcome
        return outcome

    # --- safe autonomy ----------------------------------------------------------------------

    def get_autonomy_status(self) -> autonomy_pb2.GetAutonomyStatusResponse:
        """The autonomy breaker, the disruption budgets with their holds, and every source's
        calibration."""
        response: autonomy_pb2.GetAutonomyStatusResponse = self._call(
            self._autonomy.GetAutonomyStatus,
            autonomy_pb2.GetAutonomyStatusRequest(),
            "AutonomyService/GetAutonomyStatus",
            retry=True,
        )
        return response

    def get_planner_calibration(self, source: str) -> autonomy_pb2.PlannerCalibration:
        response = self._call(
            self._autonomy.GetPlannerCalibration,
            autonomy_pb2.GetPlannerCalibrationRequest(source=source),
            "AutonomyService/GetPlannerCalibration",
            retry=True,
        )
        calibration: autonomy_pb2.PlannerCalibration = response.calibration
        return calibration

    def reset_breaker(self, reason: str) -> autonomy_pb2.AutonomyBreaker:
        """Closes a tripped autonomy breaker (operators; the reason is required and audited)."""
        response = self._call(
            self._autonomy.ResetBreaker,
            autonomy_pb2.ResetBreakerRequest(reason=reason),
            "AutonomyService/ResetBreaker",
        )
        breaker: autonomy_pb2.AutonomyBreaker = response.breaker
        return breaker

    # --- fleet and telemetry ----------------------------------------------------------------

    def list_agents(
        self, *, status: fleet_pb2.AgentStatus.ValueType | None = None, page_size: int = 0
    ) -> list[fleet_pb2.Agent]:
        """Every agent (of one status, if given), ordered by node id, all pages."""
        request = fleet_pb2.ListAgentsRequest(page_size=page_size)
        if status is not None:
            request.status = status
        return self._all_pages(self._fleet.ListAgents, request, "FleetService/ListAgents", "agents")

    def get_agent(self, node_id: str) -> fleet_pb2.Agent:
        response = self._call(
            self._fleet.GetAgent,
            fleet_pb2.GetAgentRequest(node_id=node_id),
            "FleetService/GetAgent",
            retry=True,
        )
        agent: fleet_pb2.Agent = response.agent
        return agent

    def get_fleet_telemetry(
        self, node_ids: Iterable[str] = ()
    ) -> list[telemetry_pb2.TelemetrySample]:
        """The latest sample of each node (of these nodes, if given), all pages."""
        request = telemetry_pb2.GetFleetTelemetryRequest(node_ids=list(node_ids))
        return self._all_pages(
            self._telemetry.GetFleetTelemetry,
            request,
            "TelemetryService/GetFleetTelemetry",
            "samples",
        )

    def stream_telemetry(
        self,
        node_ids: Iterable[str] = (),
        metrics: Iterable[str] = (),
        *,
        include_latest: bool = False,
    ) -> Iterator[telemetry_pb2.TelemetrySample]:
        """Samples as they arrive, of these nodes (all when empty), keeping only these field
        paths (e.g. "host.memory", "gpus.temperature_celsius"; all when empty)."""
        request = telemetry_pb2.StreamTelemetryRequest(
            node_ids=list(node_ids), metrics=list(metrics), include_latest=include_latest
        )
        for response in self._stream(
            self._telemetry.StreamTelemetry, request, "TelemetryService/StreamTelemetry"
        ):
            yield response.sample

    # --- policies ---------------------------------------------------------------------------

    def list_policies(self) -> list[policy_pb2.Policy]:
        return self._all_pages(
            self._policies.ListPolicies,
            policy_pb2.ListPoliciesRequest(),
            "PolicyService/ListPolicies",
            "policies",
        )

    def get_policy(self, policy_id: str) -> policy_pb2.Policy:
        response = self._call(
            self._policies.GetPolicy,
            policy_pb2.GetPolicyRequest(policy_id=policy_id),
            "PolicyService/GetPolicy",
            retry=True,
        )
        policy: policy_pb2.Policy = response.policy
        return policy

    def create_policy(
        self,
        policy: policy_pb2.Policy,
        *,
        request_id: str | None = None,
        validate_only: bool = False,
    ) -> policy_pb2.Policy:
        """Creates a policy; retried with one request id, like `submit_plan`."""
        request = policy_pb2.CreatePolicyRequest(
            policy=policy,
            request_id=request_id or _values.new_request_id(),
            validate_only=validate_only,
        )
        response = self._call(
            self._policies.CreatePolicy, request, "PolicyService/CreatePolicy", retry=True
        )
        created: policy_pb2.Policy = response.policy
        return created

    def update_policy(
        self,
        policy: policy_pb2.Policy,
        fields: Iterable[str] = _values.POLICY_FIELDS,
        *,
        validate_only: bool = False,
    ) -> policy_pb2.Policy:
        """Replaces these fields of the stored policy with the given policy's."""
        request = policy_pb2.UpdatePolicyRequest(policy=policy, validate_only=validate_only)
        request.update_mask.paths.extend(fields)
        response = self._call(self._policies.UpdatePolicy, request, "PolicyService/UpdatePolicy")
        updated: policy_pb2.Policy = response.policy
        return updated

    def delete_policy(self, policy_id: str, *, validate_only: bool = False) -> None:
        self._call(
            self._policies.DeletePolicy,
            policy_pb2.DeletePolicyRequest(policy_id=policy_id, validate_only=validate_only),
            "PolicyService/DeletePolicy",
        )

    # --- audit and identity -----------------------------------------------------------------

    def list_audit_events(
        self,
        *,
        principal: str = "",
        method: str = "",
        target: str = "",
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[audit_pb2.AuditEvent]:
        """At most `limit` matching events, newest first (`method` in full, e.g.
        /sentinel.v1.PlanService/CancelPlan)."""
        request = _values.audit_request(
            principal, method, target, since, until, min(max(limit, 1), 1000)
        )
        return self._all_pages(
            self._audit.ListAuditEvents, request, "AuditService/ListAuditEvents", "events", limit
        )

    def create_bootstrap_token(
        self, node_pattern: str, *, max_uses: int = 1, ttl_s: float | None = None
    ) -> enrollment_pb2.CreateBootstrapTokenResponse:
        request = enrollment_pb2.CreateBootstrapTokenRequest(
            node_pattern=node_pattern, max_uses=max_uses, ttl=_values.ttl(ttl_s)
        )
        response: enrollment_pb2.CreateBootstrapTokenResponse = self._call(
            self._enrollment.CreateBootstrapToken,
            request,
            "EnrollmentService/CreateBootstrapToken",
        )
        return response

    def revoke_certificate(
        self, serial: str, reason: str = ""
    ) -> identity_pb2.RevokeCertificateResponse:
        response: identity_pb2.RevokeCertificateResponse = self._call(
            self._identity.RevokeCertificate,
            identity_pb2.RevokeCertificateRequest(serial=serial, reason=reason),
            "IdentityService/RevokeCertificate",
        )
        return response

    def revoke_node(self, node_id: str, reason: str = "") -> identity_pb2.RevokeNodeResponse:
        response: identity_pb2.RevokeNodeResponse = self._call(
            self._identity.RevokeNode,
            identity_pb2.RevokeNodeRequest(node_id=node_id, reason=reason),
            "IdentityService/RevokeNode",
        )
        return response

    def list_revocations(self) -> list[identity_pb2.Revocation]:
        return self._all_pages(
            self._identity.ListRevocations,
            identity_pb2.ListRevocationsRequest(),
            "IdentityService/ListRevocations",
            "revocations",
        )

    def create_user(self, username: str, role: str, password: str) -> identity_pb2.User:
        response = self._call(
            self._identity.CreateUser,
            identity_pb2.CreateUserRequest(username=username, role=role, password=password),
            "IdentityService/CreateUser",
        )
        user: identity_pb2.User = response.user
        return user

    def delete_user(self, username: str) -> None:
        self._call(
            self._identity.DeleteUser,
            identity_pb2.DeleteUserRequest(username=username),
            "IdentityService/DeleteUser",
        )

    def list_users(self) -> list[identity_pb2.User]:
        return self._all_pages(
            self._identity.ListUsers,
            identity_pb2.ListUsersRequest(),
            "IdentityService/ListUsers",
            "users",
        )
