"""The caller of the current RPC, as established by the authorization interceptor."""

from __future__ import annotations

import contextvars
import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: identity, role and the certificate the call came with."""

    spiffe_id: str
    """The certificate's SPIFFE id, or `user:<name>` for a caller with a bearer token."""
    role: str
    name: str
    serial: str
    """The serial (lower-case hex) of the connection's client certificate."""
    not_before: dt.datetime | None = None
    """The client certificate's notBefore (node revocations compare against it)."""


_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "sentinel_principal", default=None
)


def current_principal() -> Principal:
    """The authenticated caller; only valid inside a handler behind the interceptor."""
    principal = _CURRENT.get()
    if principal is None:
        raise RuntimeError("no principal: the handler runs without the auth interceptor")
    return principal


def set_principal(principal: Principal) -> contextvars.Token[Principal | None]:
    return _CURRENT.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _CURRENT.reset(token)
