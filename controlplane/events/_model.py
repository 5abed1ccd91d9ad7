"""What an event is, its kinds, and which events a reader wants."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Final

AGENT_STATUS_CHANGED: Final = "agent.status_changed"
"""An agent's status changed; subject `node/<node_id>`."""
PLAN_TRANSITIONED: Final = "plan.transitioned"
"""A plan changed phase; subject `plan/<plan_id>`."""
COMMAND_FINISHED: Final = "command.finished"
"""A command's result was stored; subject `node/<node_id>/command/<command_id>`."""
ANALYSIS_MEASURED: Final = "analysis.measured"
"""A health gate measured and judged; subject `plan/<plan_id>`."""
REVOKED: Final = "identity.revoked"
"""A certificate (`certificate/<serial>`) or a node (`node/<node_id>`) was revoked."""

BREAKER_CHANGED: Final = "autonomy.breaker_changed"
"""The autonomy breaker tripped or was reset; subject `autonomy/breaker`."""

KINDS: Final = frozenset(
    {
        AGENT_STATUS_CHANGED,
        PLAN_TRANSITIONED,
        COMMAND_FINISHED,
        ANALYSIS_MEASURED,
        REVOKED,
        BREAKER_CHANGED,
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One stored domain event; `event_id` orders events as they became visible."""

    event_id: int
    at: dt.datetime
    kind: str
    subject: str
    replica_id: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a reader wants; empty means every kind or subject."""

    kinds: frozenset[str] = frozenset()
    subject_prefix: str = ""

    def matches(self, event: Event) -> bool:
        return (not self.kinds or event.kind in self.kinds) and event.subject.startswith(
            self.subject_prefix
        )


class EventWatchOverflow(Exception):
    """A watcher fell too far behind the stream and was cut off; it may resume from the last
    event id it received."""
