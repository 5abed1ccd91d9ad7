"""Password logins and their refresh-token families (OAuth 2.0 Security BCP, RFC 9700 §4.14):
each Refresh returns a new refresh token and invalidates the one it was given; presenting one
that was already used means it was copied, so the whole login is revoked, its access tokens
included. The state lives in the store, so every control plane on one database agrees."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from controlplane.identity._access_tokens import TokenInvalid, TokenIssuer, TokenPair
from controlplane.identity._users import User, _user_of
from controlplane.store import LoginRow, Store, UserRow

log = logging.getLogger(__name__)

REUSED = "a refresh token of this login was used twice (copied?)"


class LoginRevoked(TokenInvalid):
    """The token's login was revoked (a reused refresh token); its message says when and why."""


@dataclass(frozen=True, slots=True)
class LoginUser:
    """The user an access token authenticates, and the login it belongs to."""

    user: User
    login: str


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _revoked_message(row: LoginRow) -> str:
    at = row.revoked_at.isoformat() if row.revoked_at else "?"
    return f"this login was revoked at {at} ({row.revoked_reason}): log in again"


class Logins:
    """Starts logins, rotates their refresh tokens with reuse detection, and checks access
    tokens against their user and login. `on_revoked(login, reason)` is called when this
    control plane revokes a login, so its open streams can be cut at once."""

    def __init__(
        self,
        store: Store,
        tokens: TokenIssuer,
        *,
        on_revoked: Callable[[str, str], object] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._on_revoked = on_revoked
        self._clock = clock

    async def start(self, username: str) -> TokenPair:
        """A new login for `username` (whose password was just checked): its first pair."""
        pair = self._tokens.issue(username)
        now = self._clock()

        def insert(db: Session) -> None:
            # Logins whose last refresh token has expired can never be used again.
            db.execute(delete(LoginRow).where(LoginRow.expires_at < now))
            db.add(
                LoginRow(
                    login_id=pair.login,
                    username=username,
                    current_token_id=pair.refresh_token_id,
                    created_at=now,
                    rotated_at=now,
                    expires_at=pair.refresh_expires_at,
                    revoked_at=None,
                    revoked_reason="",
                )
            )

        await self._store.run(insert)
        return pair

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Trades a refresh token for a new pair of the same login; the token given is
        invalid from now on. Raises TokenInvalid (LoginRevoked when this reuse, or an earlier
        one, revoked the login)."""
        claims = self._tokens.verify_refresh(refresh_token)
        pair = self._tokens.issue(claims.username, claims.login)
        now = self._clock()

        def rotate(db: Session) -> str | None:
            if db.get(UserRow, claims.username) is None:
                raise TokenInvalid(f"user {claims.username!r} no longer exists")
            # One conditional UPDATE: of two concurrent uses of one token, exactly one wins.
            rotated = db.execute(
                update(LoginRow)
                .where(
                    LoginRow.login_id == claims.login,
                    LoginRow.username == claims.username,
                    LoginRow.current_token_id == claims.token_id,
                    LoginRow.revoked_at.is_(None),
                )
                .values(
                    current_token_id=pair.refresh_token_id,
                    rotated_at=now,
                    expires_at=pair.refresh_expires_at,
                )
            )
            if rotated.rowcount == 1:  # type: ignore[attr-defined]
                return None
            row = db.get(LoginRow, claims.login)
            if row is None or row.username != claims.username:
                raise TokenInvalid("this login has ended: log in again")
            if row.revoked_at is not None:
                raise LoginRevoked(_revoked_message(row))
            row.revoked_at = now
            row.revoked_reason = REUSED
            return _revoked_message(row)

        reused = await self._store.run(rotate)
        if reused is not None:
            log.warning(
                "refresh token reused: login of user %s revoked", claims.username,
                extra={"login": claims.login},
            )  # fmt: skip
            if self._on_revoked is not None:
                self._on_revoked(claims.login, reused)
            raise LoginRevoked(reused)
        return pair

    async def authenticate(self, access_token: str) -> LoginUser:
        """The user an access token authenticates, with its current role; raises TokenInvalid
        for an invalid token, a deleted user, or a revoked or ended login."""
        claims = self._tokens.verify_access(access_token)

        def read(db: Session) -> LoginUser:
            user = db.get(UserRow, claims.username)
            if user is None:
                raise TokenInvalid(f"user {claims.username!r} no longer exists")
            row = db.get(LoginRow, claims.login)
            if row is None or row.username != claims.username:
                raise TokenInvalid("this login has ended: log in again")
            if row.revoked_at is not None:
                raise LoginRevoked(_revoked_message(row))
            return LoginUser(_user_of(user), claims.login)

        return await self._store.run(read)

    async def refused(self, logins: dict[str, str]) -> dict[str, str]:
        """Of `logins` (login id -> username), those no longer valid, each with why: the user
        was deleted, or the login revoked or ended (possibly on another control plane)."""

        def read(db: Session) -> tuple[dict[str, LoginRow], set[str]]:
            rows: dict[str, LoginRow] = {}
            for chunk in _chunks(logins):
                query = select(LoginRow).where(LoginRow.login_id.in_(chunk))
                rows.update((r.login_id, r) for r in db.scalars(query))
            users: set[str] = set()
            for chunk in _chunks(set(logins.values())):
                users.update(
                    db.scalars(select(UserRow.username).where(UserRow.username.in_(chunk)))
                )
            return rows, users

        rows, users = await self._store.run(read)
        refused: dict[str, str] = {}
        for login, username in logins.items():
            row = rows.get(login)
            if username not in users:
                refused[login] = f"user {username!r} no longer exists"
            elif row is None or row.username != username:
                refused[login] = "this login has ended: log in again"
            elif row.revoked_at is not None:
                refused[login] = _revoked_message(row)
        return refused


def _chunks(items: Collection[str], size: int = 500) -> list[list[str]]:
    ordered = sorted(items)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
