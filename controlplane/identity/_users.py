"""Human users who log in with a password: stored with an argon2id hash, never in clear.

argon2id (RFC 9106) is memory-hard, so a stolen users table costs an attacker memory as well as
time per guess, which GPUs and ASICs do not make cheap; the hash string carries its own
parameters and salt, so they can be raised later without a migration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from certs import IdentityError, validate_name
from controlplane.store import LoginRow, Store, UserRow, has_nul

USER_ROLES: Final = ("operator", "viewer")
MIN_PASSWORD_LENGTH: Final = 12
# argon2 hashes any length, but an unbounded password is an unbounded amount of work per call.
MAX_PASSWORD_LENGTH: Final = 1024


class UserInvalid(ValueError):
    """A username, role or password the caller must fix; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UserAlreadyExists(Exception):
    """A user with that name already exists."""

    pass


class UserNotFound(Exception):
    """No user has that name."""

    pass


class InvalidCredentials(Exception):
    """Unknown user or wrong password: deliberately the same error for both."""


@dataclass(frozen=True, slots=True)
class User:
    """A person who logs in with a password, and their role."""

    username: str
    role: str
    created_at: dt.datetime


def _user_of(row: UserRow) -> User:
    return User(row.username, row.role, row.created_at)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def validate_username(username: str) -> str:
    try:
        return validate_name(username)
    except IdentityError as exc:
        raise UserInvalid("username", str(exc)) from None


class Users:
    """The users table. Hashing runs in a worker thread: it is slow on purpose."""

    def __init__(
        self,
        store: Store,
        *,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 low-memory profile
        self._clock = clock
        # Checked when the user does not exist, so that a failed login takes as long either way.
        self._decoy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def create(self, username: str, role: str, password: str) -> User:
        """Stores a new user; raises UserInvalid (naming the field) or UserAlreadyExists."""
        validate_username(username)
        if role not in USER_ROLES:
            raise UserInvalid("role", f"{role!r} is not one of {', '.join(USER_ROLES)}")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise UserInvalid("password", f"at least {MIN_PASSWORD_LENGTH} characters")
        if len(password) > MAX_PASSWORD_LENGTH or has_nul(password):
            raise UserInvalid("password", f"at most {MAX_PASSWORD_LENGTH} characters, no NUL")
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        user = User(username, role, self._clock())

        def insert(session: Session) -> bool:
            if session.get(UserRow, username) is not None:
                return False
            session.add(
                UserRow(
                    username=username,
                    role=role,
                    password_hash=password_hash,
                    created_at=user.created_at,
                )
            )
            return True

        try:
            created = await self._store.run(insert)
        except IntegrityError:
            created = False  # another control plane inserted it between our read and write
        if not created:
            raise UserAlreadyExists(f"user {username!r} already exists")
        return user

    async def delete(self, username: str) -> None:
        """Deletes the user and its logins; raises UserInvalid or UserNotFound."""
        # Checked before the query: PostgreSQL refuses a NUL in a string with an error.
        validate_username(username)

        def remove(session: Session) -> bool:
            row = session.get(UserRow, username)
            if row is None:
                return False
            session.delete(row)
            # Its logins go with it: their tokens are refused from now on.
            session.execute(delete(LoginRow).where(LoginRow.username == username))
            return True

        if not await self._store.run(remove):
            raise UserNotFound(f"no user {username!r}")

    async def get(self, username: str) -> User | None:
        def read(session: Session) -> User | None:
            row = session.get(UserRow, username)
            return None if row is None else _user_of(row)

        return await self._store.run(read)

    async def list(self) -> list[User]:
        """Every user, by username."""

        def read(session: Session) -> list[User]:
            return [
                _user_of(r) for r in session.scalars(select(UserRow).order_by(UserRow.username))
            ]

        return await self._store.run(read)

    async def verify_password(self, username: str, password: str) -> User:
        """The user whose password this is; raises InvalidCredentials otherwise, after the same
        amount of hashing whether or not the user exists."""

        def read(session: Session) -> tuple[User, str] | None:
            row = session.get(UserRow, username)
            return None if row is None else (_user_of(row), row.password_hash)

        # No name that could not have been created reaches the database (PostgreSQL refuses a
        # NUL in a string with an error rather than a miss).
        plausible = len(username) <= 128 and not has_nul(username)
        found = await self._store.run(read) if plausible else None
        stored_hash = found[1] if found is not None else self._decoy_hash
        candidate = password[:MAX_PASSWORD_LENGTH]
        if not await asyncio.to_thread(self._matches, stored_hash, candidate) or found is None:
            raise InvalidCredentials("invalid username or password")
        return found[0]

    def _matches(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
