"""The gRPC transport: servicers that translate between protobuf and the domain."""

from controlplane.api._agent_service import AgentService
from controlplane.api._audit_service import AuditService
from controlplane.api._auth_service import AuthService
from controlplane.api._autonomy_service import AutonomyService, BudgetMessages, budget_messages
from controlplane.api._convert import telemetry_sample_data
from controlplane.api._enrollment_service import (
    EnrollmentPortInterceptor,
    EnrollmentPortService,
    EnrollmentService,
)
from controlplane.api._event_service import EventService
from controlplane.api._fleet_service import FleetService
from controlplane.api._health_port import HealthPort
from controlplane.api._identity_service import IdentityService
from controlplane.api._interceptor import AuthInterceptor
from controlplane.api._plan_service import PlanService
from controlplane.api._policy_service import PolicyService
from controlplane.api._telemetry_service import MetricFilter, TelemetryService
from controlplane.api._unimplemented import PENDING_SERVICES, pending_servicer

__all__ = [
    "PENDING_SERVICES",
    "AgentService",
    "AuditService",
    "AuthInterceptor",
    "AuthService",
    "AutonomyService",
    "BudgetMessages",
    "EnrollmentPortInterceptor",
    "EnrollmentPortService",
    "EnrollmentService",
    "EventService",
    "FleetService",
    "HealthPort",
    "IdentityService",
    "MetricFilter",
    "PlanService",
    "PolicyService",
    "TelemetryService",
    "budget_messages",
    "pending_servicer",
    "telemetry_sample_data",
]
