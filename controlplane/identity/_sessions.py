"""Ending the agent sessions whose certificate or node is revoked, so a revocation takes effect
on open streams at once and not only on the next connection."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Protocol

from controlplane.identity._revocations import Revocations


class RevocableSession(Protocol):
    """What revocation needs of an open session (the fleet's agent sessions are such)."""

    @property
    def certificate_serial(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def certificate_not_before(self) -> dt.datetime | None: ...
    @property
    def closed(self) -> bool: ...
    def close(self, reason: str, *, revoked: bool = False) -> None: ...


def close_revoked_sessions(sessions: Iterable[RevocableSession], revocations: Revocations) -> int:
    """Closes each open session that the current revocation list refuses; returns how many."""
    closed = 0
    for session in sessions:
        revocation = revocations.is_revoked(
            session.certificate_serial, session.node_id, session.certificate_not_before
        )
        if revocation is not None and not session.closed:
            session.close(revocation.describe(), revoked=True)
            closed += 1
    return closed
