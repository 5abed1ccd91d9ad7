"""Node agent settings: one frozen dataclass that flags and environment variables map onto."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything the node agent can be told; defaults suit a node next to its control plane."""

    node_id: str
    """This node's id; must equal the name in the client certificate's SPIFFE id."""
    ca: pathlib.Path
    """CA bundle the control plane's certificate must chain to."""
    cert: pathlib.Path
    """The agent's client certificate."""
    key: pathlib.Path
    """The agent's private key."""
    control_plane: str = "localhost:7443"
    """host:port of the control plane."""
    state_dir: pathlib.Path = pathlib.Path("/var/lib/sentinel-agent")
    """Where the spool and the executed-command log live (survives restarts)."""
    metrics_listen: str = "127.0.0.1:9465"
    """The agent's own Prometheus /metrics address; empty disables it."""
    telemetry_interval_s: float = 5.0
    """Telemetry period until the control plane or a command says otherwise."""
    heartbeat_interval_s: float = 10.0
    """Heartbeat period when nothing else is sent (the welcome may change it)."""
    max_spool_samples: int = 17_280
    """Bound of the on-disk spool: 24 h of samples at 5 s; the oldest are dropped beyond it."""
    backoff_base_s: float = 0.5
    """First reconnect delay bound; doubles per failed attempt (full jitter)."""
    backoff_cap_s: float = 30.0
    """Largest reconnect delay bound."""
    connect_timeout_s: float = 10.0
    """How long to wait for the welcome after opening a session. After an attempt that got
    none in time the wait doubles (up to connect_timeout_max_s) and the next attempt is delayed
    by at least half that wait (up to backoff_cap_s); a welcome resets it."""
    connect_timeout_max_s: float = 60.0
    """Longest wait for the welcome after attempts in a row that timed out."""
    keepalive_time_s: float = 30.0
    """Client keepalive ping interval (the control plane accepts pings at this rate)."""
    keepalive_timeout_s: float = 10.0
    """How long to wait for a ping ack before the connection is considered dead."""
    nvml_call_timeout_s: float = 2.0
    """Deadline of one GPU collection; a hung NVML call never stalls the session."""
    command_timeout_s: float = 60.0
    """Upper bound of one command's execution when its deadline is later."""
    server_name_override: str = ""
    """TLS name to verify instead of the host in `control_plane` (testing, IP-only setups)."""
    bootstrap_token: str = field(default="", repr=False)
    """Bootstrap token (`<id>.<secret>`) to enroll with when the certificate is missing or
    expired; prefer bootstrap_token_file, which does not show in the process list."""
    bootstrap_token_file: str = ""
    """File holding a bootstrap token; read whenever the agent needs to enroll."""
    enrollment_endpoint: str = ""
    """host:port of the control plane's enrollment port; empty: the host of `control_plane`,
    port 7444."""
    trust_domain: str = "sentinel.local"
    """SPIFFE trust domain of the identity requested at enrollment."""
    kubernetes_node_name: str = ""
    """The Kubernetes node this host is, when it runs in a cluster (a DaemonSet fills it from
    the downward API, `spec.nodeName`); lets the control plane judge a workload by the
    telemetry of the nodes its pods run on."""
