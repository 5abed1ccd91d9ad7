"""The open streaming calls (Watch*, StreamTelemetry, WatchEvents...) and who opened them, so a
revoked certificate or node, a deleted user or a revoked login ends its open streams at once
instead of at their next call."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from controlplane.identity._revocations import Revocations

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class OpenStream:
    """One open streaming call: the certificate it came with, the user and login when it was
    opened with a bearer token, and how to end it."""

    method: str
    certificate_serial: str
    certificate_node: str | None
    """The node id of an agent certificate (node revocations cover it); None otherwise."""
    certificate_not_before: dt.datetime | None
    username: str | None = None
    login: str | None = None
    """The login (refresh family) of the bearer token; None for a certificate caller."""
    end: Callable[[], None] = lambda: None
    """Stops the call's handler; the transport then ends it UNAUTHENTICATED with `reason`."""
    reason: str = ""
    """Why the call was cut ("" while it is open)."""
    key: int = field(default=0)

    def cut(self, reason: str) -> bool:
        """Ends the call once, saying `reason`; False when it was already cut."""
        if self.reason:
            return False
        self.reason = reason
        self.end()
        return True


class OpenStreams:
    """The registry of open streaming calls, kept by the auth interceptor and consulted by the
    revocation and user-deletion paths."""

    def __init__(self) -> None:
        self._streams: dict[int, OpenStream] = {}
        self._keys = itertools.count(1)

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: OpenStream) -> OpenStream:
        stream.key = next(self._keys)
        self._streams[stream.key] = stream
        return stream

    def discard(self, stream: OpenStream) -> None:
        self._streams.pop(stream.key, None)

    def _cut_where(self, matches: Callable[[OpenStream], str | None]) -> int:
        cut = 0
        for stream in list(self._streams.values()):
            reason = matches(stream)
            if reason and stream.cut(reason):
                log.warning("cut open %s stream: %s", stream.method, reason)
                cut += 1
        return cut

    def cut_revoked(self, revocations: Revocations) -> int:
        """Cuts every stream whose certificate the revocation list now refuses."""

        def refused(stream: OpenStream) -> str | None:
            revocation = revocations.is_revoked(
                stream.certificate_serial, stream.certificate_node, stream.certificate_not_before
            )
            return (
                None
                if revocation is None
                else f"client certificate refused: {revocation.describe()}"
            )

        return self._cut_where(refused)

    def cut_user(self, username: str) -> int:
        """Cuts every stream opened with a token of `username` (the user was deleted)."""
        return self._cut_where(
            lambda s: (
                f"bearer token refused: user {username!r} no longer exists"
                if s.username == username
                else None
            )
        )

    def cut_login(self, login: str, reason: str) -> int:
        """Cuts every stream opened with an access token of the login `login` (revoked)."""
        return self._cut_where(
            lambda s: f"bearer token refused: {reason}" if s.login == login else None
        )

    def logins(self) -> dict[str, str]:
        """The login of every open token-authenticated stream, with its username."""
        return {
            s.login: s.username
            for s in self._streams.values()
            if s.login is not None and s.username is not None and not s.reason
        }

    async def run_sweeper(
        self,
        interval_s: float,
        refused_logins: Callable[[dict[str, str]], Awaitable[dict[str, str]]],
    ) -> None:
        """Every `interval_s`, asks which logins of open streams are no longer valid (their
        user deleted or the login revoked, possibly on another control plane) and cuts their
        streams; `refused_logins` takes {login: username} and returns {login: why}."""
        while True:
            await asyncio.sleep(interval_s)
            open_logins = self.logins()
            if not open_logins:
                continue
            for login, reason in (await refused_logins(open_logins)).items():
                self.cut_login(login, reason)
