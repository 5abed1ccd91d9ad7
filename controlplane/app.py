"""The control plane process: wires the store, fleet, telemetry hub, command ledger, gRPC
server and /metrics endpoint together, and starts and stops them in order."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import pathlib
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from sentinel.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    autonomy_pb2,
    autonomy_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
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

from controlplane._fds import OpenFilesLimit, describe, session_room
from controlplane._tls import ReloadingServerCredentials
from controlplane.api import (
    PENDING_SERVICES,
    AgentService,
    AuditService,
    AuthInterceptor,
    AuthService,
    AutonomyService,
    EnrollmentPortInterceptor,
    EnrollmentPortService,
    EnrollmentService,
    EventService,
    FleetService,
    HealthPort,
    IdentityService,
    PlanService,
    PolicyService,
    TelemetryService,
    budget_messages,
    pending_servicer,
    telemetry_sample_data,
)
from controlplane.audit import AuditLog
from controlplane.auth import RateLimiter
from controlplane.autonomy import (
    Autonomy,
    AutonomyStatus,
    BreakerState,
    autonomy_file_path,
    load_autonomy_file,
)
from controlplane.enrollment import BootstrapTokens, CertificateIssuer, load_ca
from controlplane.events import (
    AGENT_STATUS_CHANGED,
    ANALYSIS_MEASURED,
    BREAKER_CHANGED,
    COMMAND_FINISHED,
    PLAN_TRANSITIONED,
    REVOKED,
    EventLog,
    KafkaSink,
)
from controlplane.executors import (
    AgentExecutor,
    Executor,
    Executors,
    KubeClusters,
    KubernetesExecutor,
    parse_clusters,
)
from controlplane.fleet import (
    AgentRegistry,
    AgentState,
    AgentStatus,
    CommandLedger,
    CommandResult,
    CommandState,
    TelemetryAckOut,
)
from controlplane.identity import (
    Logins,
    OpenStreams,
    Revocation,
    Revocations,
    TokenIssuer,
    Users,
    close_revoked_sessions,
    load_jwt_secret,
)
from controlplane.metrics import ControlPlaneMetrics
from controlplane.plans import (
    LEASE_CHANNEL,
    TERMINAL,
    AnalysisRecord,
    BudgetState,
    DisruptionBudgets,
    FleetView,
    HealthGates,
    Lease,
    Phase,
    PipelineController,
    Plan,
    PlanChange,
    PlanDesk,
    PlanLimitsConfig,
    PredictionChecker,
    StateGuard,
    TelemetryHistory,
    parse_budgets,
    run_publisher,
)
from controlplane.policy import (
    REFRESH_INTERVAL_S,
    PolicyBook,
    PolicyEngine,
    Verdict,
    load_policy_files,
)
from controlplane.retention import Retention, RetentionPolicy
from controlplane.settings import ControlPlaneSettings
from controlplane.store import Bus, Replicas, Store
from controlplane.telemetry import Sample, TelemetryHub, TelemetryRelay
from controlplane.tracing import start_tracing
from processkit import Supervisor, tune_gc_for_long_lived_heap

log = logging.getLogger(__name__)


def _server_options(settings: ControlPlaneSettings) -> list[tuple[str, int | str]]:
    """gRPC server options, chosen for thousands of long-lived agent streams."""
    keepalive_ms = int(settings.keepalive_time_s * 1000)
    age: list[tuple[str, int | str]] = []
    if settings.max_connection_age_s > 0:
        # gRPC sends GOAWAY at the age (jittered by +/-10 %), lets open streams run for the
        # grace, then closes the connection: an agent's stream ends UNAVAILABLE and it
        # reconnects, through the load balancer, possibly to another replica.
        age = [
            ("grpc.max_connection_age_ms", max(1, int(settings.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return [
        # A second control plane on the same port must fail loudly, not share it silently.
        ("grpc.so_reuseport", 0),
        # Ping idle connections so dead peers (power loss, partitions) are noticed.
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept the agents' pings at their ~30 s rate even when no data flows (the default
        # answers pings more frequent than 5 min with GOAWAY too_many_pings).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", max(keepalive_ms // 2, 1000)),
        ("grpc.http2.max_ping_strikes", 3),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        # Bad peers: one connection may not open unbounded streams (an agent needs one, an
        # operator a few), and a connection that never finishes its TLS handshake is closed
        # instead of holding a descriptor for gRPC's default two minutes.
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        *(
            [("grpc.tsi.max_frame_size", settings.tls_max_frame_size)]
            if settings.tls_max_frame_size
            else []
        ),
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * 1000)),
        *age,
        *settings.extra_grpc_options,
    ]


def _api_service_names() -> list[str]:
    """Full names of every service of the public API (all are registered, some as pending)."""
    modules = (
        agent_pb2, audit_pb2, auth_pb2, autonomy_pb2, enrollment_pb2, events_pb2, fleet_pb2,
        identity_pb2, plan_pb2, policy_pb2, telemetry_pb2,
    )  # fmt: skip
    return sorted(
        service.full_name
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
    )


def _default_instance_name() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _AnnouncedRevocations(Revocations):
    """The revocation list, announcing each revocation this control plane makes as an event
    (those learned from another control plane are that one's to announce)."""

    def __init__(self, store: Store, events: EventLog, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self._events = events

    def _announce(self, revocation: Revocation, before: set[Revocation]) -> None:
        if revocation in before:
            return  # revoked before, unchanged: nothing happened
        subject = (
            f"node/{revocation.value}"
            if revocation.kind == "node"
            else f"certificate/{revocation.value}"
        )
        payload = {
            "revocation_kind": revocation.kind,
            "value": revocation.value,
            "reason": revocation.reason,
            "revoked_by": revocation.revoked_by,
        }
        self._events.emit(REVOKED, subject, payload)

    async def revoke_serial(self, serial: str, reason: str, revoked_by: str) -> Revocation:
        before = set(self.list())
        revocation = await super().revoke_serial(serial, reason, revoked_by)
        self._announce(revocation, before)
        return revocation

    async def revoke_node(self, node_id: str, reason: str, revoked_by: str) -> Revocation:
        before = set(self.list())
        revocation = await super().revoke_node(node_id, reason, revoked_by)
        self._announce(revocation, before)
        return revocation


class ControlPlane:
    """One control plane process: builds every part from the settings, serves, and stops them
    in order."""

    def __init__(
        self, settings: ControlPlaneSettings, *, open_files: OpenFilesLimit | None = None
    ) -> None:
        self.settings = settings
        # The open-files limit as the process entry raised it (None: as it is, not raised).
        self._open_files = open_files
        self.metrics = ControlPlaneMetrics()
        self.metrics_registry = self.metrics.registry
        self.store = Store(settings.database_url, threads=settings.store_threads)
        # Replicas (issue 11): one id per process; the bus is PostgreSQL's LISTEN/NOTIFY.
        self.instance_id = settings.controller_id or _default_instance_name()
        # Tracing (issue 13): off unless `tracing` names an exporter; then one SDK provider.
        self.tracing = start_tracing(settings.tracing, instance_id=self.instance_id)
        self.bus = Bus(self.store, self.instance_id)
        self.bus.set_audience(lambda: bool(self.replicas.others()))
        # Events (issue 13): one stored, numbered stream, followed on every replica.
        self.events = EventLog(
            self.store,
            self.bus,
            flush_interval_s=settings.event_flush_interval_s,
            on_write_failure=lambda: self.metrics.task_failures.labels("event-writer").inc(),
        )
        self.event_sink: KafkaSink | None = None
        if settings.event_sink_kafka_brokers:
            self.event_sink = KafkaSink(
                self.events,
                self.store,
                Lease(self.store, "event-sink", self.instance_id, settings.controller_lease_s),
                brokers=settings.event_sink_kafka_brokers,
                topic=settings.event_sink_kafka_topic,
                renew_every_s=settings.controller_lease_s / 3,
                on_failure=lambda: self.metrics.task_failures.labels("event-sink").inc(),
            )
        self.replicas = Replicas(
            self.store,
            self.bus,
            address=settings.replica_address or settings.listen,
            heartbeat_s=settings.replica_heartbeat_s,
            stale_after_s=settings.replica_stale_after_s,
            sessions=lambda: len(self.registry.sessions()),
        )
        self.registry = AgentRegistry(
            self.store,
            suspect_after_s=settings.suspect_after_s,
            disconnect_after_s=settings.disconnect_after_s,
            on_status_counts=self._publish_agent_counts,
            on_status_changed=self._agent_status_changed,
            replicas=self.replicas,
            bus=self.bus,
        )
        # The last minute of every node's summary metrics, for plans' outcomes (compact:
        # a few floats per GPU and sample; see controlplane/plans/_predictions.py).
        self.telemetry_history = TelemetryHistory()
        self.hub: TelemetryHub[telemetry_pb2.TelemetrySample] = TelemetryHub(
            self.store,
            ack_interval_s=settings.telemetry_ack_interval_s,
            send_ack=self._send_telemetry_ack,
            on_stored=self.registry.record_telemetry,
            on_flush=self.metrics.store_flush.observe,
            # Only replicas relay telemetry; a lone control plane only keeps the history.
            on_published=self._telemetry_published,
            on_accepted=self._telemetry_accepted,
            on_subscriptions=lambda: self.relay.subscriptions_changed(),
            on_relayed=lambda sample: self.telemetry_history.record((sample,)),
        )
        self.relay = TelemetryRelay(
            self.hub,
            self.store,
            self.bus,
            self.replicas,
            encode=lambda sample: sample.SerializeToString(),
            decode=telemetry_pb2.TelemetrySample.FromString,
            holds=lambda node_id: self.registry.session_for(node_id) is not None,
        )
        self.metrics.telemetry_subscribers.set_function(lambda: self.hub.subscriber_count)
        self.commands = CommandLedger(
            self.store,
            self.registry.session_for,
            on_finished=self._command_finished,
            bus=self.bus,
        )
        self.audit = AuditLog(
            self.store,
            on_recorded=lambda event: self.metrics.audit_events.labels(event.outcome).inc(),
            on_write_failure=lambda: self.metrics.task_failures.labels("audit-writer").inc(),
        )
        self.policy_engine = PolicyEngine(on_evaluated=self._policy_evaluated)
        self.policies = PolicyBook(self.store, self.policy_engine)
        self.clusters = KubeClusters(
            parse_clusters(settings.kubernetes_clusters), observe=self._kubernetes_request
        )
        executors: list[Executor] = [
            AgentExecutor(
                self.commands,
                node_known=self.registry.known,
                is_cordoned=self.registry.is_cordoned,
                on_cordon_changed=self.registry.set_cordoned,
                power_limits=self._power_limits,
                fresh=self.relay.fresh,
            )
        ]
        if self.clusters:
            executors.append(
                KubernetesExecutor(self.clusters, opt_in_label=settings.kubernetes_opt_in_label)
            )
        self.executors = Executors(executors)
        # Stale-plan guard (docs/safe-autonomy.md): target state recorded when a plan is judged
        # and checked again right before each step.
        self.state_guard = StateGuard(
            self.executors, sample_data=self._sample_data, fresh=self.relay.fresh
        )
        # Safe autonomy (issue 12): planner calibration and the autonomy breaker, judged on every
        # replica and read from memory on the submission path.
        self.autonomy_path = autonomy_file_path(
            settings.autonomy_policy_path, settings.policy_paths
        )
        self._calibrated_sources: set[str] = set()
        autonomy_file = load_autonomy_file(self.autonomy_path)
        self.autonomy = Autonomy(
            self.store,
            lambda: self.plans.repository,
            thresholds=autonomy_file.breaker,
            calibration_window_s=settings.planner_calibration_window_s,
            replica_id=self.instance_id,
            fleet_size=self.registry.count,
            unhealthy=self.registry.unhealthy,
            on_breaker_changed=self._breaker_changed,
            on_evaluated=self._publish_autonomy,
            interval_s=settings.autonomy_interval_s,
        )
        self.plans = PlanDesk(
            self.store,
            self.policy_engine,
            FleetView(
                fleet_size=self.registry.count,
                connected_nodes=lambda: self.registry.count(AgentStatus.CONNECTED),
                cordoned_nodes=self.registry.cordoned,
            ),
            self.executors,
            limits=PlanLimitsConfig(settings.max_plan_steps, settings.max_plan_targets),
            rate_window_s=settings.plan_rate_window_s,
            # With replicas, watchers and the controller are woken through the bus; the poll
            # is the safety net under it.
            poll_interval_s=max(settings.reconcile_interval_s, 5.0)
            if self.bus.enabled
            else settings.reconcile_interval_s,
            on_change=self._plan_changed,
            bus=self.bus,
            on_remote_change=lambda _plan_id: self.controller.wake(),
            guard=self.state_guard,
            autonomy=self.autonomy,
        )
        # Fleet-wide disruption budgets (docs/safe-autonomy.md), shared by all running plans.
        self.budgets = DisruptionBudgets(
            self.store,
            parse_budgets(list(autonomy_file.budgets), f"{self.autonomy_path}: budgets"),
            lambda: {a.node_id: a.cordoned for a in self.registry.agents()},
            on_state=self._publish_budgets,
        )
        self.controller = PipelineController(
            self.plans.repository,
            Lease(
                self.store,
                "pipeline-controller",
                self.instance_id,
                settings.controller_lease_s,
                self.bus,
                holder_alive=self.replicas.alive_in,
            ),
            self.executors,
            HealthGates(self.relay.latest, telemetry_sample_data),
            interval_s=settings.reconcile_interval_s,
            on_step_finished=lambda action, result, seconds: self.metrics.plan_step_duration.labels(
                action, result
            ).observe(seconds),
            on_phase_counts=self._publish_plan_counts,
            on_measurement=self._audit_measurement,
            predictions=PredictionChecker(self.relay.latest, telemetry_sample_data),
            history=self.telemetry_history,
            on_prediction=lambda source, verdict: self.metrics.plan_predictions.labels(
                source, verdict.lower()
            ).inc(),
            agent_on_kubernetes_node=self.registry.agent_on_kubernetes_node,
            budgets=self.budgets,
            guard=self.state_guard,
            autonomy=self.autonomy,
        )
        # Retention (issue 10): only the replica holding the controller lease prunes; deletes
        # re-check their condition, so an overlap during a lease hand-over does no harm.
        self.retention = Retention(
            self.store,
            RetentionPolicy(
                audit_s=settings.retention_audit_s,
                commands_s=settings.retention_commands_s,
                plans_s=settings.retention_plans_s,
                departed_agents_s=settings.retention_departed_agents_s,
                events_s=settings.retention_events_s,
            ),
            terminal_plan_phases=[phase.value for phase in TERMINAL],
            finished_command_states=[CommandState.FINISHED.value, CommandState.EXPIRED.value],
            departed_status=AgentStatus.DISCONNECTED.value,
            should_run=lambda: self.controller.leader,
            on_pruned=lambda table, rows: self.metrics.retention_pruned.labels(table).inc(rows),
        )
        # Identity (issue 4): revocations are checked in memory on every call; a refresh that
        # learns another control plane's revocation closes the sessions it covers here too.
        self.revocations = _AnnouncedRevocations(
            self.store, self.events, on_learned=lambda _revocation: self._close_revoked_sessions()
        )
        self.users = Users(self.store)
        self.tokens = TokenIssuer(
            load_jwt_secret(settings.jwt_secret_file),
            issuer=f"spiffe://{settings.trust_domain}",
            access_ttl_s=settings.access_token_ttl_s,
            refresh_ttl_s=settings.refresh_token_ttl_s,
        )
        # Issue 10: open streaming calls, cut when their certificate, user or login goes; a
        # reused refresh token revokes its login (and cuts that login's streams here at once).
        self.streams = OpenStreams()
        self.logins = Logins(
            self.store,
            self.tokens,
            on_revoked=lambda login, reason: self.streams.cut_login(login, reason),
        )
        self._supervisor = Supervisor(
            "controlplane", on_failure=lambda name: self.metrics.task_failures.labels(name).inc()
        )
        self._server: grpc.aio.Server | None = None
        self._agent_service: AgentService | None = None
        self._metrics_http: object | None = None
        self._health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        # Enrollment (issue 4): bootstrap tokens, the certificate issuer and its own TLS port.
        self.bootstrap_tokens = BootstrapTokens(self.store)
        self.issuer: CertificateIssuer | None = None
        self._enrollment_server: grpc.aio.Server | None = None
        self.enrollment_port = 0
        # The plaintext probe port (issue 13), opened once everything reports SERVING.
        self._health_port: HealthPort | None = None
        self.health_port = 0

    def _certificates_loaded(self, expiry: dict[str, float]) -> None:
        for certificate, timestamp in expiry.items():
            self.metrics.certificate_expiry.labels(certificate).set(timestamp)

    def _publish_process_gauges(self) -> None:
        m = self.metrics
        m.sessions_open.set_function(lambda: len(self.registry.sessions()))
        limit = self._agent_service.session_limit if self._agent_service else None
        m.sessions_capacity.set(limit or 0)
        m.replicas_live.set_function(lambda: len(self.replicas.others()) + 1)
        m.replica_bus_connected.set_function(lambda: 1.0 if self.bus.connected.is_set() else 0.0)
        loop = asyncio.get_running_loop()  # scrapes run on the HTTP server's thread
        m.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))

    async def _probe_event_loop(self, every_s: float = 0.25) -> None:
        """Measures how late the loop wakes a timer: the lag every caller and agent feels."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(every_s)
            self.metrics.event_loop_lag.observe(max(loop.time() - started - every_s, 0.0))

    def _close_revoked_sessions(self) -> int:
        """Closes the agent sessions and cuts the open streams that revocations now refuse;
        returns how many agent sessions it closed."""
        self.streams.cut_revoked(self.revocations)
        return close_revoked_sessions(self.registry.sessions(), self.revocations)

    def _publish_budgets(self, states: Sequence[BudgetState]) -> None:
        for state in states:
            self.metrics.disruption_budget_limit.labels(state.budget.name).set(state.limit)
            self.metrics.disruption_budget_in_use.labels(state.budget.name).set(state.in_use)

    def _telemetry_accepted(self, samples: list[Sample[telemetry_pb2.TelemetrySample]]) -> None:
        self.telemetry_history.record(samples)
        if self.autonomy.watches_xids:
            # New XIDs count towards the breaker; judged from the samples received here.
            observe = self.autonomy.observe_xids
            for sample in samples:
                observe(sample.node_id, tuple(gpu.last_xid for gpu in sample.payload.gpus))

    def _telemetry_published(self, samples: list[Sample[telemetry_pb2.TelemetrySample]]) -> None:
        if self.bus.enabled:
            self.relay.forward(samples)

    def _power_limits(self, node_id: str) -> dict[int, int] | None:
        """A node's GPU power limits (index to milliwatts) in its newest telemetry sample."""
        sample = self.relay.latest(node_id)
        if sample is None:
            return None
        return {
            gpu.index: gpu.power_limit_milliwatts
            for gpu in sample.payload.gpus
            if "power_limit_milliwatts" not in gpu.unsupported
        }

    def _sample_data(self, node_id: str) -> dict[str, Any] | None:
        sample = self.relay.latest(node_id)
        return None if sample is None else telemetry_sample_data(sample.payload)

    def _kubernetes_request(self, cluster: str, verb: str, seconds: float, reached: bool) -> None:
        self.metrics.kubernetes_reachable.labels(cluster).set(1 if reached else 0)
        self.metrics.kubernetes_api_latency.labels(cluster, verb).observe(seconds)

    def _publish_agent_counts(self, counts: dict[AgentStatus, int]) -> None:
        for status, count in counts.items():
            self.metrics.agents.labels(status.value.lower()).set(count)

    def _send_telemetry_ack(self, node_id: str, seq: int) -> None:
        session = self.registry.session_for(node_id)
        if session is not None:
            session.send(TelemetryAckOut(seq))

    def _agent_status_changed(self, state: AgentState, previous: AgentStatus | None) -> None:
        payload = {
            "node_id": state.node_id,
            "status": state.status.value,
            "previous_status": previous.value if previous else "",
            "session_id": state.session_id,
        }
        self.events.emit(AGENT_STATUS_CHANGED, f"node/{state.node_id}", payload)

    def _command_finished(self, result: CommandResult, round_trip_s: float) -> None:
        self.events.emit(
            COMMAND_FINISHED,
            f"node/{result.node_id}/command/{result.command_id}",
            {
                "command_id": result.command_id,
                "node_id": result.node_id,
                "action": result.action,
                "outcome": result.outcome,
                "message": result.message,
                "output": result.output,
            },
        )
        self.metrics.commands.labels(result.action, result.outcome).inc()
        if round_trip_s >= 0:
            self.metrics.command_round_trip.labels(result.action).observe(round_trip_s)

    def _policy_evaluated(self, seconds: float, verdict: Verdict) -> None:
        self.metrics.policy_evaluation.observe(seconds)
        for violation in (*verdict.rejections, *verdict.approvals_required):
            self.metrics.policy_rejections.labels(violation.rule_id, violation.effect.value).inc()

    def _breaker_changed(self, state: BreakerState, actor: str, reason: str) -> None:
        self.events.emit(
            BREAKER_CHANGED,
            "autonomy/breaker",
            {"tripped": state.tripped, "reason": reason, "actor": actor},
        )

    def _publish_autonomy(self, status: AutonomyStatus) -> None:
        self.metrics.autonomy_breaker_tripped.set(1 if status.breaker.tripped else 0)
        gauges = (
            self.metrics.planner_hit_ratio,
            self.metrics.planner_confidence,
            self.metrics.planner_rollbacks,
        )
        sources = set()
        for calibration in status.calibration:
            source = calibration.source
            sources.add(source)
            self.metrics.planner_hit_ratio.labels(source).set(calibration.hit_rate)
            self.metrics.planner_confidence.labels(source).set(calibration.mean_confidence)
            self.metrics.planner_rollbacks.labels(source).set(calibration.rollbacks)
        # Sources gone from the window go from the metrics too (one by one: a scrape runs on
        # another thread and must never see the others missing).
        for source in self._calibrated_sources - sources:
            for gauge in gauges:
                gauge.remove(source)
        self._calibrated_sources = sources

    def _plan_changed(self, change: PlanChange) -> None:
        self.autonomy.note(change.plan)
        plan_id = change.plan.plan_id
        for transition in change.transitions:
            self.events.emit(
                PLAN_TRANSITIONED,
                f"plan/{plan_id}",
                {
                    "plan_id": plan_id,
                    "from_phase": transition.from_phase.value,
                    "to_phase": transition.to_phase.value,
                    "time": transition.at.isoformat(),
                    "actor": transition.actor,
                    "reason": transition.reason,
                },
            )
            self.metrics.plan_transitions.labels(transition.to_phase.value.lower()).inc()
        if change.plan.phase == Phase.APPROVED or change.plan.cancel_requested:
            self.controller.wake()

    async def _audit_measurement(self, plan: Plan, record: AnalysisRecord) -> None:
        self.events.emit(
            ANALYSIS_MEASURED,
            f"plan/{plan.plan_id}",
            {"plan_id": plan.plan_id, **dataclasses.asdict(record)},
        )
        detail = json.dumps(
            {
                "gate": record.gate,
                "step": record.step_index,
                "target": record.target,
                "point": record.point,
                "query": record.query,
                "value": record.value,
                "condition": record.condition,
            },
            separators=(",", ":"),
        )
        await self.audit.record(
            "pipeline-controller", "plan.analysis", f"plan/{plan.plan_id}", record.verdict, detail
        )

    def _publish_plan_counts(self, counts: dict[str, int]) -> None:
        for phase in Phase:
            self.metrics.plans.labels(phase.value.lower()).set(counts.get(phase.value, 0))

    async def start(self) -> None:
        settings = self.settings
        credentials = ReloadingServerCredentials(
            settings.tls, on_loaded=self._certificates_loaded
        ).credentials()
        file_policies = await asyncio.to_thread(load_policy_files, settings.policy_paths)
        await asyncio.to_thread(self.clusters.prepare)
        await asyncio.to_thread(self.store.migrate)
        await self.replicas.register()
        await self.policies.install_files(file_policies)
        await self.registry.load()
        await self.revocations.load()
        await self.events.start()
        # A breaker tripped before a restart holds planner plans from the first submission on.
        await self.autonomy.evaluate()

        server = grpc.aio.server(
            interceptors=[
                # Outermost, so a call's span covers authentication and auditing, and refused
                # calls are traced with their status code.
                *self.tracing.server_interceptors(),
                AuthInterceptor(
                    settings.trust_domain,
                    self.metrics,
                    self.audit,
                    revocations=self.revocations,
                    logins=self.logins,
                    streams=self.streams,
                ),
            ],
            options=_server_options(settings),
        )
        self.issuer = await asyncio.to_thread(self._make_issuer)
        # Counted once the store, policies and issuer hold their files; the listening sockets
        # opened below come out of the reserve.
        room = session_room(
            self._open_files or OpenFilesLimit.current(), settings.open_files_reserve
        )
        log.log(*describe(room, settings.max_agents))
        self._agent_service = AgentService(
            settings,
            self.registry,
            self.hub,
            self.commands,
            self.metrics,
            issuer=self.issuer,
            session_room=room,
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self._agent_service, server)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(FleetService(self.registry), server)
        events_pb2_grpc.add_EventServiceServicer_to_server(
            EventService(self.events, settings.event_watch_backlog), server
        )
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(
            TelemetryService(settings, self.hub, self.relay), server
        )
        plan_pb2_grpc.add_PlanServiceServicer_to_server(
            PlanService(self.plans, settings.default_step_timeout_s), server
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditService(self.audit), server)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyService(self.policies), server)
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(
            IdentityService(
                self.revocations, self.users, self._close_revoked_sessions, self.streams.cut_user
            ),
            server,
        )
        autonomy_pb2_grpc.add_AutonomyServiceServicer_to_server(
            AutonomyService(self.autonomy, budget_messages(self.budgets)),
            server,
        )
        auth_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthService(self.users, self.logins, settings.login_rate_per_minute), server
        )
        enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentService(self.bootstrap_tokens, settings.bootstrap_token_ttl_s), server
        )
        for base, register, feature in PENDING_SERVICES:
            register(pending_servicer(base, feature), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = _api_service_names()
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.port = server.add_secure_port(settings.listen, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen} (address in use?)")
        await server.start()
        self._server = server
        await self._start_enrollment_server()

        if settings.metrics_listen:
            host, _, port = settings.metrics_listen.rpartition(":")
            http_server, _thread = start_http_server(
                int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.metrics.registry
            )
            self._metrics_http = http_server
            self.metrics_port = http_server.server_port

        self.bus.subscribe(LEASE_CHANNEL, lambda _sender, _name: self.controller.wake())
        self._publish_process_gauges()
        self._supervisor.start("event-loop-probe", self._probe_event_loop)
        self._supervisor.start("replica-bus", self.bus.run)
        self._supervisor.start("replica-heartbeat", self.replicas.run_heartbeat)
        self._supervisor.start("telemetry-relay", self.relay.run)
        if self.bus.enabled:
            self._supervisor.start("agent-directory", self.registry.run_directory_refresher)
            self._supervisor.start("command-pending-sweeper", self.commands.run_pending_sweeper)
        self._supervisor.start("event-writer", self.events.run_writer)
        self._supervisor.start("event-follower", self.events.run_follower)
        if self.event_sink is not None:
            self._supervisor.start("event-sink", self.event_sink.run)
        self._supervisor.start(
            "audit-flusher", lambda: self.audit.run_flusher(settings.audit_flush_interval_s)
        )
        self._supervisor.start(
            "telemetry-flusher", lambda: self.hub.run_flusher(settings.telemetry_flush_interval_s)
        )
        self._supervisor.start(
            "liveness-sweeper",
            lambda: self.registry.run_sweeper(1.0, settings.last_seen_persist_interval_s),
        )
        self._supervisor.start("pipeline-controller", self.controller.run)
        self._supervisor.start("autonomy-breaker", self.autonomy.run)
        if self.budgets:
            self._supervisor.start("disruption-budgets", lambda: run_publisher(self.budgets, 5.0))
        if settings.retention_interval_s > 0:
            self._supervisor.start(
                "retention", lambda: self.retention.run(settings.retention_interval_s)
            )
        if self.clusters:
            self._supervisor.start(
                "kubernetes-prober",
                lambda: self.clusters.run_prober(settings.kubernetes_probe_interval_s),
            )
        self._supervisor.start(
            "revocation-refresher",
            lambda: self.revocations.run_refresher(settings.revocation_refresh_interval_s),
        )
        self._supervisor.start(
            "stream-sweeper",
            lambda: self.streams.run_sweeper(
                settings.revocation_refresh_interval_s, self.logins.refused
            ),
        )
        self._supervisor.start(
            "policy-refresher", lambda: self.policies.run_refresher(REFRESH_INTERVAL_S)
        )
        tune_gc_for_long_lived_heap(settings.gc_gen0_threshold)
        for service in ("", *names):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if settings.health_listen:
            self._health_port = HealthPort(self._health, settings.health_listen)
            self.health_port = await self._health_port.start()
        log.info(
            "control plane serving on port %d (metrics on %s)",
            self.port,
            self.metrics_port or "off",
        )

    # -- enrollment port ------------------------------------------------------------------------

    def _make_issuer(self) -> CertificateIssuer:
        """The issuer of agent certificates; without a usable CA key it refuses with a message
        saying what to configure (enrollment and renewal only, the rest still serves)."""
        tls = self.settings.tls
        key = (
            pathlib.Path(self.settings.ca_key) if self.settings.ca_key else tls.ca.parent / "ca.key"
        )
        ca = load_ca(tls.ca, key)
        if isinstance(ca, str):
            log.warning("enrollment and certificate renewal are refused: %s", ca)
        return CertificateIssuer(
            self.store,
            self.bootstrap_tokens,
            ca=ca,
            ca_bundle_pem=tls.ca.read_bytes(),
            trust_domain=self.settings.trust_domain,
            lifetime=dt.timedelta(seconds=self.settings.agent_certificate_lifetime_s),
        )

    async def _start_enrollment_server(self) -> None:
        """A second server, TLS without client certificates, serving Enroll alone."""
        settings = self.settings
        if not settings.enrollment_listen or self.issuer is None:
            return
        server = grpc.aio.server(
            interceptors=[EnrollmentPortInterceptor()], options=_server_options(settings)
        )
        enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentPortService(
                self.issuer,
                RateLimiter(settings.enroll_rate_per_minute),
                self.audit,
                self.metrics,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        credentials = ReloadingServerCredentials(settings.tls).credentials(
            require_client_auth=False
        )
        self.enrollment_port = server.add_secure_port(settings.enrollment_listen, credentials)
        if self.enrollment_port == 0:
            raise OSError(f"cannot listen on {settings.enrollment_listen} (address in use?)")
        await server.start()
        self._enrollment_server = server
        log.info("enrollment port %d serving Enroll", self.enrollment_port)

    async def _flush_audit(self) -> None:
        """Writes the calls audited up to the server's stop; a failure is logged, not raised,
        so the rest of the shutdown still persists what it must."""
        try:
            await self.audit.flush()
        except Exception:
            log.exception("%d audit event(s) could not be written at shutdown", self.audit.pending)

    async def _flush_events(self) -> None:
        """Writes the events emitted up to the stop (a sink delivers them after a restart)."""
        try:
            await self.events.flush()
        except Exception:
            log.exception("%d event(s) could not be written at shutdown", self.events.pending)

    async def stop(self) -> None:
        """Tells agents to reconnect later, lets calls finish, then persists what is pending."""
        await self._health.enter_graceful_shutdown()
        AgentService.go_away_all(
            self.registry,
            "control plane shutting down",
            self.settings.reconnect_after_shutdown_s,
            spread_s=self.settings.reconnect_after_shutdown_spread_s,
        )
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)
            self._server = None
        if self._enrollment_server is not None:
            await self._enrollment_server.stop(self.settings.shutdown_grace_s)
            self._enrollment_server = None
        if self._health_port is not None:
            await self._health_port.stop(0)
            self._health_port = None
        if self._agent_service is not None:
            await self._agent_service.wait_sessions_closed(self.settings.shutdown_grace_s)
        await self._supervisor.stop()
        await self._flush_audit()
        await self._flush_events()
        await asyncio.to_thread(self.tracing.flush)
        await self.hub.flush()
        await self.registry.persist_last_seen()
        try:
            await self.replicas.deregister()
        except Exception as exc:
            log.warning("could not remove this replica's row (it goes stale instead): %s", exc)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]
            self._metrics_http.server_close()  # type: ignore[attr-defined]
        self.clusters.close()
        self.store.close()
        log.info("control plane stopped")
