"""Control plane settings: one frozen dataclass that flags and environment variables map onto."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files the server serves with; re-read when they change on disk (hot rotation)."""

    ca: pathlib.Path
    """CA bundle that client certificates must chain to."""
    cert: pathlib.Path
    """The server's certificate (chain)."""
    key: pathlib.Path
    """The server's private key."""


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """Everything the control plane can be told; defaults are safe for one machine."""

    tls: TlsFiles
    """Serving certificate, key and client CA."""
    listen: str = "127.0.0.1:7443"
    """gRPC address (host:port; port 0 picks a free one)."""
    metrics_listen: str = "127.0.0.1:9464"
    """Prometheus /metrics address; empty disables it."""
    health_listen: str = ""
    """Plaintext address serving only grpc.health.v1 (for Kubernetes' gRPC probes, which
    speak no TLS), reporting what the main port reports; empty disables it."""
    database_url: str = "sqlite:///sentinel.db"
    """SQLAlchemy URL of the store."""
    store_threads: int = 4
    """Threads (and connections) talking to PostgreSQL at once; SQLite always uses one."""
    trust_domain: str = "sentinel.local"
    """SPIFFE trust domain whose identities are accepted."""
    telemetry_interval_s: float = 5.0
    """How often agents send telemetry (told to them in the welcome)."""
    heartbeat_interval_s: float = 10.0
    """How often agents send a heartbeat when they have nothing else to say."""
    suspect_after_s: float = 30.0
    """Silence on an open session after which a node becomes Suspect (3 heartbeats)."""
    disconnect_after_s: float = 90.0
    """Time as Suspect after which a node becomes Disconnected; longer than the keepalive
    interval plus timeout, so a connection keepalive has not yet given up on is never dropped."""
    keepalive_time_s: float = 30.0
    """Server-side keepalive ping interval (agents ping at the same rate)."""
    keepalive_timeout_s: float = 10.0
    """How long to wait for a keepalive ping ack before closing the connection."""
    hello_timeout_s: float = 10.0
    """How long a new session may take to send its hello."""
    telemetry_flush_interval_s: float = 0.2
    """How often accepted telemetry is persisted, published and acknowledged."""
    telemetry_ack_interval_s: float = 30.0
    """Minimum time between telemetry acks to one node when it is caught up (acks coalesce;
    the agent keeps unacknowledged samples in its spool, so this costs nothing in safety)."""
    last_seen_persist_interval_s: float = 15.0
    """How often nodes' `last_seen` is written to the store (liveness is judged in memory)."""
    max_batch_samples: int = 500
    """Largest telemetry batch an agent may send."""
    subscriber_queue: int = 10_000
    """Samples a slow StreamTelemetry subscriber may fall behind before it is cut off."""
    gc_gen0_threshold: int = 50_000
    """CPython's first-generation GC threshold for this process (0 keeps the default, 700);
    see processkit/_gc.py for why a server with thousands of sessions wants it higher."""
    shutdown_grace_s: float = 5.0
    """How long in-flight calls get to finish on shutdown."""
    reconnect_after_shutdown_s: float = 2.0
    """What agents are told to wait before reconnecting after a graceful shutdown (the least
    of the GoAway window)."""
    reconnect_after_shutdown_spread_s: float = 3.0
    """Width of the GoAway window: each agent is told a delay drawn uniformly from
    [reconnect_after_shutdown_s, reconnect_after_shutdown_s + this], so a stopping replica's
    agents do not all land on the survivors at once; 0 tells every agent the same."""
    max_connection_age_s: float = 0.0
    """Age after which gRPC closes a connection (GOAWAY, then `max_connection_age_grace_s`,
    then the stream ends and the agent reconnects, possibly to another replica; gRPC jitters
    the age by +/-10 %); spreads agents over replicas after a scale-up. 0: never."""
    max_connection_age_grace_s: float = 10.0
    """Time an aged connection's open streams get after its GOAWAY before they are cut."""
    max_agents: int = 0
    """Agent sessions this replica holds at most; beyond it new sessions are refused with
    UNAVAILABLE and a retry-after, so agents go to another replica. 0: no limit."""
    capacity_retry_after_s: float = 5.0
    """Least retry-after of a session refused for capacity (drawn uniformly from [this,
    2 x this], sent as `retry-after-ms` trailing metadata)."""
    open_files_reserve: int = 0
    """Descriptors kept out of agent sessions' reach for everything else (database connections,
    operators' calls, connections of agents being refused, metrics scrapes): sessions beyond the
    soft open-files limit, less what is open at start and this, are refused like those beyond
    `max_agents` (reason `fd_limit`). 0: 5 % of the limit, at least 64."""
    max_opening_sessions: int = 512
    """Sessions being opened at once (hello read, registered, welcomed, unfinished commands
    re-sent); beyond it a new session is refused with UNAVAILABLE and a short retry-after, so a
    reconnect storm is admitted at the rate the control plane can hold instead of letting every
    hello time out in its backlog. Openings arriving together are written to the store in one
    transaction, so a high limit costs little; a refused agent pays a new TLS handshake when
    it comes back, which costs more than waiting here. 0: no limit."""
    admission_retry_after_s: float = 1.0
    """Least retry-after of a session refused by admission control (drawn from [this, 3 x
    this], so refused agents come back spread out)."""
    max_streams_per_connection: int = 1000
    """Concurrent streams (calls) one client connection may open (HTTP/2
    SETTINGS_MAX_CONCURRENT_STREAMS): a bound on abuse, far above what a client needs. Calls
    opened before the client has read the limit are refused (REFUSED_STREAM, UNAVAILABLE), so
    a low value hurts bursty clients."""
    tls_max_frame_size: int = 4096
    """Largest TLS record the server sends and buffers per connection (bytes; gRPC keeps it
    within 1,024 to 16,384; 0 leaves its default of 16,384). Each connection holds a buffer
    of this size for its whole life: 4 KB instead of 16 KB saves about 8 KB per agent
    (measured at 1,000 agents); messages larger than a frame are sent as several."""
    handshake_timeout_s: float = 10.0
    """A connection that has not finished its TLS handshake by then is closed (half-open or
    stalled clients do not hold descriptors)."""
    policy_paths: str = ""
    """Comma-separated YAML policy files or directories of them, loaded at start (read-only
    through PolicyService); empty loads none."""
    autonomy_policy_path: str = ""
    """The autonomy policy file (YAML): breaker thresholds and the fleet-wide disruption
    budgets under `budgets:` (docs/safe-autonomy.md); empty: `autonomy.yaml` in a
    `policy_paths` directory (policies skip that name), and without one no budgets and a breaker
    that never trips."""
    planner_calibration_window_s: float = 24 * 3600.0
    """Window of each plan source's calibration (`source` in policies, GetPlannerCalibration):
    plans that ended within it, their rollbacks and judged predictions."""
    autonomy_interval_s: float = 2.0
    """How often each replica re-reads calibration and the breaker and judges the breaker's
    thresholds (also at once after each plan that ends here)."""
    kubernetes_clusters: str = ""
    """Kubernetes clusters plans may act on: comma-separated `NAME=KUBECONFIG[#CONTEXT]` or
    `NAME=in-cluster`; empty: none (steps on Kubernetes objects are refused at submission)."""
    kubernetes_opt_in_label: str = ""
    """`KEY=VALUE` a Deployment or StatefulSet must carry for plans to change it (e.g.
    `sentinel.io/managed=true`); empty: any workload in an allowed namespace."""
    kubernetes_probe_interval_s: float = 30.0
    """How often every cluster's API server is asked for its version (reachability metric)."""
    plan_rate_window_s: float = 3600.0
    """Window over which per-target rate-limit rules count earlier plans (`history.recent`)."""
    reconcile_interval_s: float = 1.0
    """How often the pipeline controller re-reads stored plans (it also wakes on every change)."""
    controller_lease_s: float = 10.0
    """Leadership lease of the pipeline controller; a stopped leader is replaced after this."""
    controller_id: str = ""
    """This replica's id (in the replicas table, the agent directory and the controller
    lease); empty derives host:pid:random, new for every process."""
    replica_address: str = ""
    """The address this replica is known by to peers and shown in the agent directory
    (GetAgent/ListAgents); empty uses `listen`."""
    replica_heartbeat_s: float = 1.0
    """How often this replica writes its heartbeat row and re-reads the others'."""
    replica_stale_after_s: float = 5.0
    """A replica whose heartbeat is older than this is dead: the agents it held get the
    liveness grace period and are free to be held elsewhere."""
    default_step_timeout_s: float = 300.0
    """Deadline of a plan step that names none (agent commands included)."""
    max_plan_steps: int = 100
    """Most steps one plan may carry."""
    max_plan_targets: int = 1000
    """Most targets one plan step may carry."""
    audit_flush_interval_s: float = 0.1
    """How often audited calls are written to the store (plan transitions are written at once,
    in the transaction that makes them)."""
    enrollment_listen: str = "127.0.0.1:7444"
    """Address of the enrollment port (TLS, no client certificate, only Enroll); empty
    disables enrollment."""
    ca_key: str = ""
    """The CA's private key (PEM), to sign enrolled and renewed agent certificates; empty:
    `ca.key` next to the CA bundle. Without it, enrollment and renewal are refused."""
    agent_certificate_lifetime_s: float = 24 * 3600.0
    """Lifetime of certificates issued at enrollment and renewal."""
    bootstrap_token_ttl_s: float = 30 * 60.0
    """Default lifetime of a bootstrap token."""
    enroll_rate_per_minute: float = 10.0
    """Enroll calls allowed per peer address per minute (bursts up to the same number)."""
    jwt_secret_file: str = ""
    """File with the secret that signs login tokens (HS256, at least 32 bytes); empty: a
    random secret per process (tokens then die with a restart and differ per instance)."""
    access_token_ttl_s: float = 15 * 60.0
    """Lifetime of an access token from Login or Refresh."""
    refresh_token_ttl_s: float = 12 * 3600.0
    """Lifetime of a refresh token."""
    login_rate_per_minute: float = 5.0
    """Login attempts allowed per user and per peer address per minute."""
    revocation_refresh_interval_s: float = 2.0
    """How often revocations made by another control plane on the same store are picked up."""
    extra_grpc_options: tuple[tuple[str, int | str], ...] = field(default=())
    """Additional grpc server options, for experiments."""
    event_flush_interval_s: float = 0.05
    """How often emitted domain events are written to the store (and so reach WatchEvents
    and the sinks); a full batch of 1,000 is written at once."""
    event_watch_backlog: int = 10_000
    """Events a slow WatchEvents subscriber may fall behind before it is cut off
    (RESOURCE_EXHAUSTED; it resumes from its last event id)."""
    event_sink_kafka_brokers: str = ""
    """Comma-separated `host:port` bootstrap brokers of the Kafka event sink; empty: no sink.
    One replica at a time runs it (the `event-sink` lease)."""
    event_sink_kafka_topic: str = "sentinel.events"
    """Topic the Kafka event sink writes to (partition 0, key: the event id)."""
    tracing: str = ""
    """`otlp` exports a span per API call and a trace per plan (OpenTelemetry; endpoint,
    sampler and batching from the standard OTEL_* variables), `console` prints them; empty or
    `off`: no tracing, at no cost. OTEL_SDK_DISABLED=true turns it off (docs/tracing.md)."""
    retention_audit_s: float = 90 * 86400.0
    """How long audit events are kept (by when they happened); 0 keeps them forever."""
    retention_commands_s: float = 30 * 86400.0
    """How long finished or expired node commands are kept (by when they finished; those of a
    plan still running are always kept); 0 keeps them forever."""
    retention_plans_s: float = 90 * 86400.0
    """How long plans in a terminal phase are kept, whole, with their transitions and targets
    (by their last change); 0 keeps them forever."""
    retention_departed_agents_s: float = 30 * 86400.0
    """How long a node Disconnected (and not cordoned) keeps its row: inventory and telemetry
    watermark; 0 keeps it forever."""
    retention_events_s: float = 7 * 86400.0
    """How long domain events (WatchEvents, event sinks) are kept; 0 keeps them forever."""
    retention_interval_s: float = 600.0
    """How often the replica holding the pipeline-controller lease prunes what is older than
    the retentions above (500 rows per transaction, a pause between); 0 never prunes."""
