"""Domain objects of the fleet: agent status and state, sessions and what they send down."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class AgentStatus(enum.StrEnum):
    """Liveness of an agent as the control plane sees it."""

    CONNECTED = "CONNECTED"
    SUSPECT = "SUSPECT"
    DISCONNECTED = "DISCONNECTED"


class Liveness(NamedTuple):
    """A node's liveness alone, without building its whole `AgentState`."""

    node_id: str
    status: AgentStatus
    last_seen: float
    """Unix time the node was last heard from."""


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
    inventory_json: str
    """The inventory (host and GPUs) as compact JSON: a node's dicts take about five times
    the memory, held for every node of the fleet; `inventory` decodes it."""
    last_telemetry_seq: int
    telemetry_gap_samples: int
    session_id: str = ""
    cordoned: bool = False
    replica_id: str = ""
    """The replica holding the node's session ("" when none does)."""
    replica_address: str = ""
    connected_at: dt.datetime | None = None
    kubernetes_node_name: str = ""
    """The Kubernetes node the agent said it runs on (`host.kubernetesNodeName`), if any."""

    @property
    def inventory(self) -> dict[str, Any]:
        """The inventory as the agent reported it: `host` and `gpus` (a fresh dict)."""
        decoded: dict[str, Any] = json.loads(self.inventory_json) if self.inventory_json else {}
        return decoded


def compact_inventory(inventory: dict[str, Any]) -> tuple[str, str]:
    """`AgentState`'s form of an inventory: its compact JSON and its Kubernetes node name."""
    host = inventory.get("host") or {}
    node_name = host.get("kubernetesNodeName", "") if isinstance(host, dict) else ""
    return json.dumps(inventory, separators=(",", ":")), str(node_name or "")


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


@dataclass(eq=False, slots=True)
class AgentSession:
    """One open `AgentService.Connect` stream; the transport drains it with `next_outbound`.

    Held for every connected node, so it is kept small: a plain list and at most one waiting
    future rather than an asyncio.Queue and an asyncio.Event (about 4 KB per session)."""

    session_id: str
    node_id: str
    closed: bool = False
    close_reason: str = ""
    on_close: Callable[[], None] | None = None
    """Called once when the session is closed from the control plane's side."""
    certificate_serial: str = ""
    """Serial (lower-case hex) of the client certificate the session was opened with."""
    certificate_not_before: dt.datetime | None = None
    revoked: bool = False
    """Closed because its certificate or node was revoked (the stream ends UNAUTHENTICATED)."""
    _outbound: list[Outbound | None] = field(default_factory=list)
    _waiter: asyncio.Future[None] | None = None

    def send(self, message: Outbound) -> None:
        if not self.closed:
            self._put(message)

    def _put(self, message: Outbound | None) -> None:
        self._outbound.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_outbound(self) -> Outbound | None:
        """The next message to write, in the order sent; None once the session is closed."""
        while not self._outbound:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._outbound.pop(0)

    def close(self, reason: str, *, revoked: bool = False) -> None:
        """Ends the session: the transport stops writing and finishes the stream."""
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.revoked = revoked
            self._put(None)
            if self.on_close is not None:
                self.on_close()
