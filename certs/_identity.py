"""SPIFFE-shaped identities: `spiffe://<trust-domain>/<role>/<name>`, parsed strictly."""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("agent", "planner", "operator", "viewer")
DEFAULT_TRUST_DOMAIN = "sentinel.local"

# Names become node ids, log fields and metric labels: keep them to a safe, DNS-like alphabet.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?$")


class IdentityError(ValueError):
    """A SPIFFE id or identity name that Sentinel does not accept."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate speaks for."""

    trust_domain: str
    role: str
    name: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.role}/{self.name}"

    def __str__(self) -> str:
        return self.spiffe_id


def validate_name(name: str) -> str:
    """Returns `name` when it is a valid identity name (node id, operator name), else raises."""
    if not _NAME.match(name):
        raise IdentityError(
            f"invalid name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def parse_spiffe_id(uri: str, trust_domain: str | None = None) -> Identity:
    """Parses `spiffe://domain/role/name`; when `trust_domain` is given it must match."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise IdentityError(f"not a SPIFFE id: {uri!r}")
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 3:
        raise IdentityError(f"SPIFFE id must be spiffe://<domain>/<role>/<name>: {uri!r}")
    domain, role, name = parts
    if not _TRUST_DOMAIN.match(domain):
        raise IdentityError(f"invalid trust domain in {uri!r}")
    if trust_domain is not None and domain != trust_domain:
        raise IdentityError(f"trust domain {domain!r} is not {trust_domain!r}")
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r} in {uri!r}; roles are {', '.join(ROLES)}")
    validate_name(name)
    return Identity(domain, role, name)
