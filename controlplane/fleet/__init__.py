"""The fleet: agent registry, liveness, sessions and the command ledger."""

from controlplane.fleet._commands import (
    CommandLedger,
    CommandResult,
    CommandState,
    CommandTimeout,
    UnknownCommand,
)
from controlplane.fleet._model import (
    AgentSession,
    AgentState,
    AgentStatus,
    CommandOut,
    ConfigOut,
    GoAwayOut,
    HelloInfo,
    Liveness,
    Outbound,
    TelemetryAckOut,
)
from controlplane.fleet._registry import AgentRegistry, WatcherOverflow

__all__ = [
    "AgentRegistry",
    "AgentSession",
    "AgentState",
    "AgentStatus",
    "CommandLedger",
    "CommandOut",
    "CommandResult",
    "CommandState",
    "CommandTimeout",
    "ConfigOut",
    "GoAwayOut",
    "HelloInfo",
    "Liveness",
    "Outbound",
    "TelemetryAckOut",
    "UnknownCommand",
    "WatcherOverflow",
]
