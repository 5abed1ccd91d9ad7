"""Revoked certificate serials and nodes: stored in the database, held in memory so every call
is checked without a database round trip, and re-read periodically so control planes sharing a
database converge."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from certs import IdentityError, validate_name
from controlplane.store import RevocationRow, Store, has_nul

log = logging.getLogger(__name__)

KIND_SERIAL = "serial"
KIND_NODE = "node"
MAX_REASON_LENGTH = 1024

# X.509 serials are at most 20 octets (RFC 5280 §4.1.2.2): 40 hex digits.
_HEX_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")


class RevocationInvalid(ValueError):
    """A serial, node id or reason the caller must fix; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked certificate serial or node, with who revoked it, when and why."""

    kind: str
    """KIND_SERIAL or KIND_NODE."""
    value: str
    """The serial (lower-case hex without leading zeros) or the node id."""
    reason: str
    revoked_at: dt.datetime
    revoked_by: str

    def describe(self) -> str:
        """What a refused caller is told: what was revoked, when, and why."""
        what = f"certificate {self.value}" if self.kind == KIND_SERIAL else f"node {self.value}"
        why = f" ({self.reason})" if self.reason else ""
        return f"{what} was revoked at {self.revoked_at.isoformat()}{why}"


def normalize_serial(serial: str) -> str:
    """The canonical form of a serial as `openssl x509 -serial` or `sentinelctl` print it:
    lower-case hex, no `0x`, colons or leading zeros; raises RevocationInvalid."""
    text = serial.strip().lower().replace(":", "")
    text = text.removeprefix("serial=").removeprefix("0x")
    if not _HEX_SERIAL.match(text):
        raise RevocationInvalid(
            "serial", f"{serial[:64]!r} is not a certificate serial (1-40 hexadecimal digits)"
        )
    return text.lstrip("0") or "0"


def _validate_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_LENGTH or has_nul(reason):
        raise RevocationInvalid("reason", f"at most {MAX_REASON_LENGTH} characters, no NUL")
    return reason


def _revocation_of(row: RevocationRow) -> Revocation:
    return Revocation(row.kind, row.value, row.reason, row.revoked_at, row.revoked_by)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Revocations:
    """The revocation list. `on_learned` is called for each revocation that another control
    plane made, when a refresh first sees it, so this one can close the sessions it holds."""

    def __init__(
        self,
        store: Store,
        *,
        on_learned: Callable[[Revocation], object] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._on_learned = on_learned
        self._clock = clock
        self._serials: dict[str, Revocation] = {}
        self._nodes: dict[str, Revocation] = {}
        self._loaded = False

    async def load(self) -> None:
        """Reads the whole list (it is small: one row per revoked certificate or node)."""

        def read(session: Session) -> list[Revocation]:
            return [_revocation_of(row) for row in session.scalars(select(RevocationRow))]

        rows = await self._store.run(read)
        serials = {r.value: r for r in rows if r.kind == KIND_SERIAL}
        nodes = {r.value: r for r in rows if r.kind == KIND_NODE}
        learned = [r for r in serials.values() if r.value not in self._serials] + [
            r for r in nodes.values() if self._nodes.get(r.value) != r
        ]
        first_load, self._loaded = not self._loaded, True
        self._serials, self._nodes = serials, nodes
        if self._on_learned is not None and not first_load:
            for revocation in learned:
                self._on_learned(revocation)

    async def run_refresher(self, interval_s: float) -> None:
        """Re-reads the list every `interval_s`, picking up other control planes' revocations."""
        while True:
            await asyncio.sleep(interval_s)
            await self.load()

    async def revoke_serial(self, serial: str, reason: str, revoked_by: str) -> Revocation:
        """Refuses the certificate with `serial` for good. Revoking it again keeps the first
        record."""
        value = normalize_serial(serial)
        existing = self._serials.get(value)
        if existing is not None:
            return existing
        revocation = await self._store_revocation(
            Revocation(KIND_SERIAL, value, _validate_reason(reason), self._clock(), revoked_by),
            replace=False,
        )
        self._serials[value] = revocation
        return revocation

    async def revoke_node(self, node_id: str, reason: str, revoked_by: str) -> Revocation:
        """Refuses every certificate of `node_id` issued (notBefore) up to now; revoking it
        again moves that time forward, to cover certificates issued in between."""
        try:
            validate_name(node_id)
        except IdentityError as exc:
            raise RevocationInvalid("node_id", str(exc)) from None
        revocation = await self._store_revocation(
            Revocation(KIND_NODE, node_id, _validate_reason(reason), self._clock(), revoked_by),
            replace=True,
        )
        self._nodes[node_id] = revocation
        return revocation

    async def _store_revocation(self, revocation: Revocation, *, replace: bool) -> Revocation:
        def write(session: Session) -> Revocation:
            row = session.get(RevocationRow, (revocation.kind, revocation.value))
            if row is not None and not replace:
                return _revocation_of(row)  # another control plane revoked it first
            if row is None:
                row = RevocationRow(kind=revocation.kind, value=revocation.value)
                session.add(row)
            row.reason = revocation.reason
            row.revoked_at = revocation.revoked_at
            row.revoked_by = revocation.revoked_by
            return revocation

        stored = await self._store.run(write)
        log.warning("revoked %s %s (by %s)", stored.kind, stored.value, stored.revoked_by)
        return stored

    def is_revoked(
        self, serial: str, node_id: str | None, not_before: dt.datetime | None
    ) -> Revocation | None:
        """The revocation that refuses a certificate, or None. `node_id` is given for agent
        certificates only; a node revocation covers those whose notBefore is at or before it
        (a certificate without a known notBefore counts as covered)."""
        revocation = self._serials.get(serial)
        if revocation is not None:
            return revocation
        if node_id is not None:
            node = self._nodes.get(node_id)
            if node is not None and (not_before is None or not_before <= node.revoked_at):
                return node
        return None

    def list(self) -> list[Revocation]:
        """Every revocation, serials first, each kind by value."""
        return sorted(
            (*self._serials.values(), *self._nodes.values()), key=lambda r: (r.kind, r.value)
        )
