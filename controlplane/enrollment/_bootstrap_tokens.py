"""Bootstrap tokens: short-lived, use-counted secrets that let a new node enroll once.

A token reads `<token_id>.<secret>`. Only the id and the SHA-256 of the secret are stored: the
secret is 256 random bits, so a fast hash already makes the stored value useless to a reader of
the database (there is nothing to brute-force, unlike a password), and checking it costs nothing.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from controlplane.store import BOOTSTRAP_TOKENS, Store

_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
# A node name, or a glob of one: the name alphabet plus `*`, `?` and `[...]` classes.
_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,128}$")
MAX_TOKEN_TTL = dt.timedelta(days=7)
MAX_TOKEN_USES = 10_000


class TokenRequestInvalid(ValueError):
    """A token creation request with a bad field; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TokenRefused(Exception):
    """A token that does not allow this enrollment; `reason` is one of unknown, expired,
    used_up, wrong_scope."""

    def __init__(self, reason: str, message: str, token_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.token_id = token_id


@dataclass(frozen=True, slots=True)
class CreatedToken:
    """A bootstrap token as created: the secret (shown once) and what it allows."""

    token: str
    """The full token, shown once and never stored."""
    token_id: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class RedeemedToken:
    """A bootstrap token spent on one enrollment, and the node names it allows."""

    token_id: str
    node_pattern: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(token: str) -> tuple[str, str] | None:
    token_id, dot, secret = token.strip().partition(".")
    if not dot or not _TOKEN_ID.match(token_id) or not _SECRET.match(secret):
        return None
    return token_id, secret


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class BootstrapTokens:
    """Creates, stores (hashed) and redeems single-use bootstrap tokens for enrollment."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store = store
        self._clock = clock

    async def create(
        self, node_pattern: str, *, max_uses: int, ttl: dt.timedelta, created_by: str
    ) -> CreatedToken:
        """Stores a new token for nodes matching `node_pattern`; raises TokenRequestInvalid."""
        if not _PATTERN.match(node_pattern):
            raise TokenRequestInvalid(
                "node_pattern",
                f"{node_pattern!r} is not a node name or glob (1-128 letters, digits, "
                "'.', '_', '-', and the wildcards '*', '?', '[...]')",
            )
        if not 1 <= max_uses <= MAX_TOKEN_USES:
            raise TokenRequestInvalid("max_uses", f"{max_uses} is out of range 1..{MAX_TOKEN_USES}")
        if not dt.timedelta(0) < ttl <= MAX_TOKEN_TTL:
            raise TokenRequestInvalid(
                "ttl", f"{ttl.total_seconds():g} s is out of range (0 s, {MAX_TOKEN_TTL}]"
            )
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        expires_at = now + ttl

        def write(db: Connection) -> None:
            db.execute(
                insert(BOOTSTRAP_TOKENS).values(
                    token_id=token_id,
                    secret_hash=_hash(secret),
                    node_pattern=node_pattern,
                    max_uses=max_uses,
                    uses=0,
                    created_at=now,
                    expires_at=expires_at,
                    created_by=created_by[:512],
                )
            )

        await self._store.run_core(write)
        return CreatedToken(f"{token_id}.{secret}", token_id, expires_at)

    def redeem(self, db: Connection, token: str, node_id: str) -> RedeemedToken:
        """Takes one use of `token` for `node_id` inside the caller's transaction (roll it back
        and the use is returned); raises TokenRefused.

        The use is taken by one conditional UPDATE, the transaction's first statement: whatever
        two enrollments do at once, only as many succeed as there were uses left, on SQLite
        (the UPDATE takes the write lock before anything is read) and PostgreSQL (the second
        UPDATE waits on the row lock, then re-checks `uses < max_uses`) alike.
        """
        parts = _split(token)
        if parts is None:
            raise TokenRefused("unknown", "the bootstrap token is not valid")
        token_id, secret = parts
        secret_hash = _hash(secret)
        now = self._clock()
        taken = db.execute(
            update(BOOTSTRAP_TOKENS)
            .where(
                BOOTSTRAP_TOKENS.c.token_id == token_id,
                BOOTSTRAP_TOKENS.c.secret_hash == secret_hash,
                BOOTSTRAP_TOKENS.c.uses < BOOTSTRAP_TOKENS.c.max_uses,
                BOOTSTRAP_TOKENS.c.expires_at > now,
            )
            .values(uses=BOOTSTRAP_TOKENS.c.uses + 1)
        ).rowcount
        row = db.execute(
            select(BOOTSTRAP_TOKENS).where(BOOTSTRAP_TOKENS.c.token_id == token_id)
        ).first()
        # Unknown id and wrong secret read the same: the answer must not confirm an id exists.
        if row is None or not hmac.compare_digest(row.secret_hash, secret_hash):
            raise TokenRefused("unknown", "the bootstrap token is not valid")
        if taken != 1:
            expires_at = _utc(row.expires_at)
            if expires_at <= now:
                raise TokenRefused(
                    "expired",
                    f"bootstrap token {token_id} expired at {expires_at.isoformat()}",
                    token_id,
                )
            raise TokenRefused("used_up", f"bootstrap token {token_id} has been used up", token_id)
        if not fnmatch.fnmatchcase(node_id, row.node_pattern):
            # Raising makes the caller's transaction roll back, which returns the use taken.
            raise TokenRefused(
                "wrong_scope",
                f"bootstrap token {token_id} is for nodes {row.node_pattern!r}, not {node_id!r}",
                token_id,
            )
        return RedeemedToken(token_id, row.node_pattern)
