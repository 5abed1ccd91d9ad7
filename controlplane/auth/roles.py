"""Which roles may call which RPC: one table, the single source of truth for authorization.

A method missing from the table is refused for every role (deny by default). The role is the
certificate's (spiffe://<domain>/<role>/<name>) or, for a call with a bearer token, the logged-in
user's (operator or viewer). A certificate without a valid SPIFFE id has no role ("none") and is
refused UNAUTHENTICATED before this table is consulted.
"""

from __future__ import annotations

from typing import Final

AGENT: Final = "agent"
PLANNER: Final = "planner"
OPERATOR: Final = "operator"
VIEWER: Final = "viewer"

_READERS = frozenset({PLANNER, OPERATOR, VIEWER})
_EVERYONE = frozenset({AGENT, PLANNER, OPERATOR, VIEWER})

_V1 = "/sentinel.v1."

METHOD_ROLES: Final[dict[str, frozenset[str]]] = {
    f"{_V1}AgentService/Connect": frozenset({AGENT}),
    f"{_V1}AgentService/RenewCertificate": frozenset({AGENT}),
    f"{_V1}FleetService/ListAgents": _READERS,
    f"{_V1}FleetService/GetAgent": _READERS,
    f"{_V1}FleetService/WatchAgents": _READERS,
    f"{_V1}TelemetryService/GetNodeTelemetry": _READERS,
    f"{_V1}TelemetryService/GetFleetTelemetry": _READERS,
    f"{_V1}TelemetryService/StreamTelemetry": _READERS,
    f"{_V1}PlanService/SubmitPlan": frozenset({PLANNER, OPERATOR}),
    f"{_V1}PlanService/GetPlan": _READERS,
    f"{_V1}PlanService/ListPlans": _READERS,
    f"{_V1}PlanService/WatchPlan": _READERS,
    f"{_V1}PlanService/ApprovePlan": frozenset({OPERATOR}),
    f"{_V1}PlanService/CancelPlan": frozenset({PLANNER, OPERATOR}),
    f"{_V1}PlanService/GetPlanOutcome": _READERS,
    f"{_V1}AutonomyService/GetAutonomyStatus": _READERS,
    f"{_V1}AutonomyService/GetPlannerCalibration": _READERS,
    f"{_V1}AutonomyService/ResetBreaker": frozenset({OPERATOR}),
    f"{_V1}PolicyService/ListPolicies": _READERS,
    f"{_V1}PolicyService/GetPolicy": _READERS,
    f"{_V1}PolicyService/CreatePolicy": frozenset({OPERATOR}),
    f"{_V1}PolicyService/UpdatePolicy": frozenset({OPERATOR}),
    f"{_V1}PolicyService/DeletePolicy": frozenset({OPERATOR}),
    f"{_V1}AuditService/ListAuditEvents": frozenset({OPERATOR}),
    f"{_V1}EventService/WatchEvents": _READERS,
    f"{_V1}EventService/ListEvents": _READERS,
    # Any certificate of ours may carry a human's login: the password or refresh token is what
    # authenticates the user (whose role then applies to the calls made with the token), so the
    # certificate's own role does not matter here; a certificate without a SPIFFE id may not.
    f"{_V1}AuthService/Login": _EVERYONE,
    f"{_V1}AuthService/Refresh": _EVERYONE,
    f"{_V1}EnrollmentService/CreateBootstrapToken": frozenset({OPERATOR}),
    f"{_V1}IdentityService/RevokeCertificate": frozenset({OPERATOR}),
    f"{_V1}IdentityService/RevokeNode": frozenset({OPERATOR}),
    f"{_V1}IdentityService/ListRevocations": frozenset({OPERATOR}),
    f"{_V1}IdentityService/CreateUser": frozenset({OPERATOR}),
    f"{_V1}IdentityService/DeleteUser": frozenset({OPERATOR}),
    f"{_V1}IdentityService/ListUsers": frozenset({OPERATOR}),
    # Enroll is served on the enrollment port (no client certificate), never here.
    "/grpc.health.v1.Health/Check": _EVERYONE,
    "/grpc.health.v1.Health/Watch": _EVERYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _EVERYONE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _EVERYONE,
}

# Calls that change something: each one is written to the audit log whatever its outcome.
# AgentService/Connect is the agent's session, not one change; the fleet registry logs it.
MUTATING_METHODS: Final[frozenset[str]] = frozenset(
    {
        f"{_V1}PlanService/SubmitPlan",
        f"{_V1}PlanService/ApprovePlan",
        f"{_V1}PlanService/CancelPlan",
        f"{_V1}AutonomyService/ResetBreaker",
        f"{_V1}PolicyService/CreatePolicy",
        f"{_V1}PolicyService/UpdatePolicy",
        f"{_V1}PolicyService/DeletePolicy",
        f"{_V1}EnrollmentService/CreateBootstrapToken",
        f"{_V1}AgentService/RenewCertificate",
        f"{_V1}AuthService/Login",
        f"{_V1}AuthService/Refresh",
        f"{_V1}EnrollmentService/Enroll",
        f"{_V1}IdentityService/RevokeCertificate",
        f"{_V1}IdentityService/RevokeNode",
        f"{_V1}IdentityService/CreateUser",
        f"{_V1}IdentityService/DeleteUser",
    }
)


def allowed(method: str, role: str) -> bool:
    return role in METHOD_ROLES.get(method, frozenset())
