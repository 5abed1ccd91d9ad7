"""Domain events: one stream of what happened (agents, plans, commands, gates, revocations),
stored with increasing ids, followed on every replica, and delivered to sinks (Kafka)."""

from controlplane.events._kafka import KafkaSink, SinkLease, event_json
from controlplane.events._log import EVENT_CHANNEL, EventLog
from controlplane.events._model import (
    AGENT_STATUS_CHANGED,
    ANALYSIS_MEASURED,
    BREAKER_CHANGED,
    COMMAND_FINISHED,
    KINDS,
    PLAN_TRANSITIONED,
    REVOKED,
    Event,
    EventFilter,
    EventWatchOverflow,
)

__all__ = [
    "AGENT_STATUS_CHANGED",
    "ANALYSIS_MEASURED",
    "BREAKER_CHANGED",
    "COMMAND_FINISHED",
    "EVENT_CHANNEL",
    "KINDS",
    "PLAN_TRANSITIONED",
    "REVOKED",
    "Event",
    "EventFilter",
    "EventLog",
    "EventWatchOverflow",
    "KafkaSink",
    "SinkLease",
    "event_json",
]
