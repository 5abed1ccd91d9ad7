"""Ending the agent sessions whose certificate or node is revoked, so a revocation takes effect
on open streams at once and not only on the next connection."""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.fleet import AgentSession
from controlplane.identity._revocations import Revocations


def close_revoked_sessions(sessions: Iterable[AgentSession], revocations: Revocations) -> int:
    """Closes each open session that the current revocation list refuses; returns how many."""
    closed = 0
    for session in sessions:
        revocation = revocations.is_revoked(
            session.certificate_serial, session.node_id, session.certificate_not_before
        )
        if revocation is not None and not session.closed.is_set():
            session.close(revocation.describe(), revoked=True)
            closed += 1
    return closed
