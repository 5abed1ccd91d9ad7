"""Domain objects of the fleet: agent status and state, sessions and what they send down."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class AgentStatus(enum.StrEnum):
    """Liveness of an agent as the control plane sees it."""

    CONNECTED = "CONNECTED"
    SUSPECT = "SUSPECT"
    DISCONNECTED = "DISCONNECTED"


@dataclass(frozen=True, slots=True)
class AgentState:
    """A snapshot of one agent as the registry knows it."""

    node_id: str
    status: AgentStatus
    first_seen: dt.datetime
    last_seen: dt.datetime
    agent_version: str
    spiffe_id: str
    capabilities: tuple[str, ...]
    inventory: dict[str, Any]
    last_telemetry_seq: int
    telemetry_gap_samples: int
    session_id: str = ""
    cordoned: bool = False
    replica_id: str = ""
    """The replica holding the node's session ("" when none does)."""
    replica_address: str = ""
    connected_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class HelloInfo:
    """What an agent says about itself when its session opens."""

    node_id: str
    spiffe_id: str
    agent_version: str
    capabilities: tuple[str, ...]
    inventory: dict[str, Any]
    next_telemetry_seq: int
    oldest_unacked_seq: int
    boot_count: int


# Messages the control plane sends down a session; the transport turns them into protobuf.
@dataclass(frozen=True, slots=True)
class TelemetryAckOut:
    """A cumulative telemetry acknowledgement to send to an agent."""

    seq: int


@dataclass(frozen=True, slots=True)
class CommandOut:
    """A command to send down an agent's session."""

    command_id: str
    plan_id: str
    action: str
    parameters: dict[str, Any]
    deadline: dt.datetime


@dataclass(frozen=True, slots=True)
class ConfigOut:
    """A configuration update to send to an agent."""

    telemetry_interval_s: float


@dataclass(frozen=True, slots=True)
class GoAwayOut:
    """Tells an agent to close its session and reconnect after a delay."""

    reason: str
    reconnect_after_s: float


Outbound = TelemetryAckOut | CommandOut | ConfigOut | GoAwayOut


@dataclass(eq=False)
class AgentSession:
    """One open `AgentService.Connect` stream; the transport drains `outbound`."""

    session_id: str
    node_id: str
    outbound: asyncio.Queue[Outbound | None] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    on_close: Callable[[], None] | None = None
    """Called once when the session is closed from the control plane's side."""
    certificate_serial: str = ""
    """Serial (lower-case hex) of the client certificate the session was opened with."""
    certificate_not_before: dt.datetime | None = None
    revoked: bool = False
    """Closed because its certificate or node was revoked (the stream ends UNAUTHENTICATED)."""

    def send(self, message: Outbound) -> None:
        if not self.closed.is_set():
            self.outbound.put_nowait(message)

    def close(self, reason: str, *, revoked: bool = False) -> None:
        """Ends the session: the transport stops writing and finishes the stream."""
        if not self.closed.is_set():
            self.close_reason = reason
            self.revoked = revoked
            self.closed.set()
            self.outbound.put_nowait(None)
            if self.on_close is not None:
                self.on_close()
