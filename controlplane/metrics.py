"""The control plane's Prometheus metrics, on a registry of its own (one per instance)."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ControlPlaneMetrics:
    """Every Prometheus metric the control plane exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.grpc_requests = Counter(
            "sentinel_grpc_requests",
            "gRPC calls handled, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_latency = Histogram(
            "sentinel_grpc_request_duration_seconds",
            "Time to answer unary gRPC calls.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.agents = Gauge(
            "sentinel_agents", "Known agents by liveness status.", ["status"], registry=r
        )
        self.sessions_opened = Counter(
            "sentinel_agent_sessions_opened", "Agent sessions accepted.", registry=r
        )
        self.sessions_refused = Counter(
            "sentinel_agent_sessions_refused",
            "Agent sessions refused, by reason (among them capacity: max_agents reached; "
            "fd_limit: the open-files limit reached; admission: too many being opened).",
            ["reason"],
            registry=r,
        )
        self.telemetry_received = Counter(
            "sentinel_telemetry_samples_received",
            "Telemetry samples received from agents (including duplicates).",
            registry=r,
        )
        self.telemetry_duplicates = Counter(
            "sentinel_telemetry_duplicate_samples",
            "Telemetry samples dropped because their (node, seq) was already held.",
            registry=r,
        )
        self.telemetry_gaps = Counter(
            "sentinel_telemetry_gap_samples",
            "Telemetry samples never received (gaps in an agent's seq).",
            registry=r,
        )
        self.telemetry_subscribers = Gauge(
            "sentinel_telemetry_subscribers", "Open StreamTelemetry subscriptions.", registry=r
        )
        self.agent_events = Counter(
            "sentinel_agent_events", "Events reported by agents, by kind.", ["kind"], registry=r
        )
        self.commands = Counter(
            "sentinel_commands",
            "Commands finished, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.command_round_trip = Histogram(
            "sentinel_command_round_trip_seconds",
            "From a command being sent to its result arriving.",
            ["action"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_flush = Histogram(
            "sentinel_telemetry_flush_seconds",
            "Time to persist one batch of telemetry watermarks.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.task_failures = Counter(
            "sentinel_task_failures", "Background task failures, by task.", ["task"], registry=r
        )
        self.plans = Gauge(
            "sentinel_plans", "Plans known to this control plane, by phase.", ["phase"], registry=r
        )
        self.plan_transitions = Counter(
            "sentinel_plan_transitions",
            "Plan phase transitions, by the phase entered.",
            ["phase"],
            registry=r,
        )
        self.plan_step_duration = Histogram(
            "sentinel_plan_step_duration_seconds",
            "Time to run one plan step on all its targets, by action and result.",
            ["action", "result"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.plan_predictions = Counter(
            "sentinel_plan_predictions",
            "Verdicts on plans' predicted effects, by plan source and verdict (held, missed, "
            "inconclusive).",
            ["source", "verdict"],
            registry=r,
        )
        self.policy_evaluation = Histogram(
            "sentinel_policy_evaluation_seconds",
            "Time to evaluate all policies against one plan.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.policy_rejections = Counter(
            "sentinel_policy_violations",
            "Policy rules violated by submitted plans, by rule and effect.",
            ["rule", "effect"],
            registry=r,
        )
        self.audit_events = Counter(
            "sentinel_audit_events", "Audit events recorded, by outcome.", ["outcome"], registry=r
        )
        self.kubernetes_reachable = Gauge(
            "sentinel_kubernetes_cluster_reachable",
            "1 when the cluster's API server answered the last request (any status), else 0.",
            ["cluster"],
            registry=r,
        )
        self.kubernetes_api_latency = Histogram(
            "sentinel_kubernetes_api_request_seconds",
            "Time of requests to a cluster's API server, by cluster and verb.",
            ["cluster", "verb"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        # Saturation and health of this process (issue 13: alerts need them).
        ProcessCollector(registry=r)
        if GC_COLLECTOR is not None:
            GCCollector(registry=r)
        self.event_loop_lag = Histogram(
            "sentinel_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 0.25 s): a saturated control "
            "plane answers everything late.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.sessions_open = Gauge(
            "sentinel_agent_sessions_open",
            "Agent sessions this replica holds now.",
            registry=r,
        )
        self.sessions_capacity = Gauge(
            "sentinel_agent_sessions_capacity",
            "Agent sessions this replica holds at most: max_agents, or fewer when its "
            "open-files limit leaves room for fewer; 0 means no limit.",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "sentinel_tls_certificate_expiry_timestamp_seconds",
            "When a certificate the control plane serves with expires (unix time): the "
            "serving certificate, and the CA bundle's first certificate to expire.",
            ["certificate"],
            registry=r,
        )
        self.replicas_live = Gauge(
            "sentinel_replicas_live",
            "Control-plane replicas alive on this database, this one included.",
            registry=r,
        )
        self.asyncio_tasks = Gauge(
            "sentinel_asyncio_tasks",
            "Tasks alive on the control plane's event loop (about two per agent session); a "
            "count that only grows is a leak.",
            registry=r,
        )
        self.retention_pruned = Counter(
            "sentinel_retention_pruned_rows",
            "Rows deleted because they outlived their retention, by table.",
            ["table"],
            registry=r,
        )
        self.disruption_budget_limit = Gauge(
            "sentinel_disruption_budget_limit",
            "Nodes a disruption budget lets be changed or cordoned at once.",
            ["budget"],
            registry=r,
        )
        self.disruption_budget_in_use = Gauge(
            "sentinel_disruption_budget_in_use",
            "Nodes counted against a disruption budget now: held by running plans' waves, or "
            "cordoned.",
            ["budget"],
            registry=r,
        )
        self.planner_hit_ratio = Gauge(
            "sentinel_planner_prediction_hit_ratio",
            "Share of a plan source's predictions judged within the calibration window that "
            "held (1 when none was judged).",
            ["source"],
            registry=r,
        )
        self.planner_confidence = Gauge(
            "sentinel_planner_stated_confidence",
            "Mean confidence a plan source stated for its predictions judged within the "
            "calibration window (0 when none).",
            ["source"],
            registry=r,
        )
        self.planner_rollbacks = Gauge(
            "sentinel_planner_recent_rollbacks",
            "Plans of a source that rolled back (or failed after a step ran) within the "
            "calibration window.",
            ["source"],
            registry=r,
        )
        self.autonomy_breaker_tripped = Gauge(
            "sentinel_autonomy_breaker_tripped",
            "1 while the autonomy breaker is tripped (planner plans need an operator), else 0.",
            registry=r,
        )
        self.replica_bus_connected = Gauge(
            "sentinel_replica_bus_connected",
            "1 while this replica listens for the others' notifications (PostgreSQL), else 0.",
            registry=r,
        )
