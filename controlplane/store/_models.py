"""The relational schema of the control plane (SQLAlchemy 2.x declarative models)."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    """The declarative base of the store's ORM models."""

    pass


class AgentRow(Base):
    """One registered node agent: its liveness and what it reported about itself."""

    __tablename__ = "agents"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    first_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    last_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    spiffe_id: Mapped[str] = mapped_column(String(512), default="")
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_telemetry_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    telemetry_gap_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    # Cordoned in Sentinel's scheduling view (set by the cordon/uncordon node actions).
    cordoned: Mapped[bool] = mapped_column(default=False)
    # The agent directory: the replica holding the node's session ("" when none), the session
    # and when it opened. The most recent connection wins; an entry naming a replica whose
    # heartbeat is stale is ignored by every reader.
    replica_id: Mapped[str] = mapped_column(String(64), default="")
    session_id: Mapped[str] = mapped_column(String(64), default="")
    connected_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class CommandRow(Base):
    """A command for one node: written before it is sent, updated by its ack and result."""

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_node_state", "node_id", "state"),)

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128))
    plan_id: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    deadline: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    acked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(32), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    output: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# The tables themselves, for Core statements on hot paths (executemany batches).
AGENTS = cast(Table, AgentRow.__table__)
COMMANDS = cast(Table, CommandRow.__table__)


class PlanRow(Base):
    """One action plan: what was asked (the submitted body) and where it stands (phase)."""

    __tablename__ = "plans"
    __table_args__ = (
        Index("ix_plans_phase", "phase"),
        Index("ix_plans_source_created", "source", "created_at"),
        # Planner calibration reads the plans that ended (changed) recently.
        Index("ix_plans_updated", "updated_at"),
    )

    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Idempotency key of SubmitPlan; the body's digest tells a replay from a conflicting reuse.
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    request_digest: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(128))
    rationale: Mapped[str] = mapped_column(Text, default="")
    confidence: Mapped[float] = mapped_column(default=0.0)
    submitted_by: Mapped[str] = mapped_column(String(512))
    phase: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    expire_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # Steps (with their state and per-node results), health gates and limits, as JSON.
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    violations: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    status_message: Mapped[str] = mapped_column(Text, default="")
    # Bumped on every change, so watchers polling the store notice any write.
    version: Mapped[int] = mapped_column(Integer, default=1)


class PlanTargetRow(Base):
    """One target a plan touches ("node/<id>" or "k8s/<cluster>/<ns>/<kind>/<name>"); serves
    the ListPlans target filter and per-target rate limits."""

    __tablename__ = "plan_targets"
    __table_args__ = (Index("ix_plan_targets_target_created", "target", "created_at"),)

    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(512), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class PlanTransitionRow(Base):
    """A phase change of a plan, in order: when, who, why."""

    __tablename__ = "plan_transitions"
    __table_args__ = (Index("ix_plan_transitions_plan", "plan_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    plan_id: Mapped[str] = mapped_column(String(64))
    from_phase: Mapped[str] = mapped_column(String(24))
    to_phase: Mapped[str] = mapped_column(String(24))
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(512))
    reason: Mapped[str] = mapped_column(Text, default="")


class PolicyRow(Base):
    """A policy: named rules in CEL. `origin` is "file:<path>" for policies loaded at start."""

    __tablename__ = "policies"

    policy_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(default=True)
    origin: Mapped[str] = mapped_column(String(512), default="api")
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class AuditEventRow(Base):
    """One audited event: a mutating call or a plan transition."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_time", "at"),
        Index("ix_audit_principal_time", "principal", "at"),
        Index("ix_audit_target_time", "target", "at"),
    )

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    principal: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(256))
    target: Mapped[str] = mapped_column(String(512), default="")
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")


class LeaseRow(Base):
    """A named lease (the controller's leadership). `epoch` grows with every new holder and
    fences writes: a holder whose epoch is no longer current may not write."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class ReplicaRow(Base):
    """One running control-plane replica: its heartbeat, the address its peers and agents know
    it by, and which nodes' telemetry its subscribers want relayed from the other replicas."""

    __tablename__ = "replicas"

    replica_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    sessions: Mapped[int] = mapped_column(Integer, default=0)
    # ["*"] for every node, else the node ids wanted (empty: none); bumped version on change.
    interest: Mapped[list[str]] = mapped_column(JSON, default=list)
    interest_version: Mapped[int] = mapped_column(BigInteger, default=0)


REPLICAS = cast(Table, ReplicaRow.__table__)
PLANS = cast(Table, PlanRow.__table__)
PLAN_TARGETS = cast(Table, PlanTargetRow.__table__)
PLAN_TRANSITIONS = cast(Table, PlanTransitionRow.__table__)
POLICIES = cast(Table, PolicyRow.__table__)
AUDIT_EVENTS = cast(Table, AuditEventRow.__table__)
LEASES = cast(Table, LeaseRow.__table__)


class BootstrapTokenRow(Base):
    """A bootstrap token for enrollment: only a hash of its secret is kept."""

    __tablename__ = "bootstrap_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    node_pattern: Mapped[str] = mapped_column(String(128))
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    created_by: Mapped[str] = mapped_column(String(512))


class IssuedCertificateRow(Base):
    """A client certificate the control plane issued (enrollment or renewal)."""

    __tablename__ = "issued_certificates"
    __table_args__ = (Index("ix_issued_certificates_node", "node_id", "issued_at"),)

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128))
    spiffe_id: Mapped[str] = mapped_column(String(512))
    issued_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    not_after: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    via: Mapped[str] = mapped_column(String(16))  # "enroll" or "renew"


class RevocationRow(Base):
    """A revoked certificate serial, or a revoked node (every certificate issued before)."""

    __tablename__ = "revocations"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # "serial" or "node"
    value: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    revoked_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    revoked_by: Mapped[str] = mapped_column(String(512))


class UserRow(Base):
    """A human operator who logs in with a password (stored as a slow hash)."""

    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


BOOTSTRAP_TOKENS = cast(Table, BootstrapTokenRow.__table__)
ISSUED_CERTIFICATES = cast(Table, IssuedCertificateRow.__table__)
REVOCATIONS = cast(Table, RevocationRow.__table__)
USERS = cast(Table, UserRow.__table__)


class EventRow(Base):
    """One domain event (agent status, plan transition, command result, measurement,
    revocation); the autoincrement id is the event id clients resume from."""

    __tablename__ = "events"
    # AUTOINCREMENT on SQLite: ids are never reused, even after the newest rows are deleted.
    __table_args__ = (
        Index("ix_events_subject", "subject", "event_id"),
        {"sqlite_autoincrement": True},
    )

    # BigInteger on PostgreSQL (bigserial); SQLite autoincrements only an INTEGER primary key.
    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(512))
    replica_id: Mapped[str] = mapped_column(String(64), default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EventSinkOffsetRow(Base):
    """How far an event sink (the Kafka sink) has delivered: the last event id the broker
    acknowledged, so a restarted sink resumes after it."""

    __tablename__ = "event_sink_offsets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


EVENTS = cast(Table, EventRow.__table__)
EVENT_SINK_OFFSETS = cast(Table, EventSinkOffsetRow.__table__)


class LoginRow(Base):
    """One password login and its chain of refresh tokens (a refresh family): only the newest
    refresh token is valid; presenting an older one revokes the whole login."""

    __tablename__ = "refresh_families"
    __table_args__ = (
        Index("ix_refresh_families_username", "username"),
        Index("ix_refresh_families_expires_at", "expires_at"),
    )

    login_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    username: Mapped[str] = mapped_column(String(128))
    current_token_id: Mapped[str] = mapped_column(String(32))
    """The `jti` of the only refresh token of this login that may still be used."""
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    rotated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    """When the current refresh token expires; the row may be pruned after that."""
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked_reason: Mapped[str] = mapped_column(Text, default="")


REFRESH_FAMILIES = cast(Table, LoginRow.__table__)


class DisruptionBudgetRow(Base):
    """A configured disruption budget as last computed (its limit and covered nodes); the row
    is locked while a plan takes holds against it, so the decision is atomic across replicas."""

    __tablename__ = "disruption_budgets"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    node_limit: Mapped[int] = mapped_column(Integer)
    nodes_covered: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class DisruptionHoldRow(Base):
    """A node of a running wave counted against a budget: kept from before the wave's actions
    until its gates are judged, and released when the wave ends or the plan is terminal."""

    __tablename__ = "disruption_holds"
    __table_args__ = (Index("ix_disruption_holds_plan", "plan_id"),)

    budget: Mapped[str] = mapped_column(String(128), primary_key=True)
    # "node/<id>" or "k8s/<cluster>/Node/<name>".
    node: Mapped[str] = mapped_column(String(512), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


DISRUPTION_BUDGETS = cast(Table, DisruptionBudgetRow.__table__)
DISRUPTION_HOLDS = cast(Table, DisruptionHoldRow.__table__)


class AutonomyBreakerRow(Base):
    """The autonomy breaker (one row, id 1): whether it is tripped, why and by which replica,
    and the last reset (who, when, why); changed only by conditional updates on `version`."""

    __tablename__ = "autonomy_breaker"

    breaker_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tripped: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    trip_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    tripped_by: Mapped[str] = mapped_column(String(128), default="")
    reset_by: Mapped[str] = mapped_column(String(512), default="")
    reset_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    reset_reason: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)


AUTONOMY_BREAKER = cast(Table, AutonomyBreakerRow.__table__)
