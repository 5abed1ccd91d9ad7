"""Access and refresh tokens for users who logged in with a password: JWTs signed with HS256
and a secret only the control planes hold. The algorithm is pinned and every claim is required,
so `alg: none`, a foreign key or a token of the other kind is refused, never trusted."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import jwt

log = logging.getLogger(__name__)

ACCESS: Final = "access"
REFRESH: Final = "refresh"
MIN_SECRET_BYTES: Final = 32
_ALGORITHM: Final = "HS256"
_AUDIENCE: Final = "sentinel-api"
# `sid` names the login (the refresh family) a token belongs to; `jti` tells one token of a
# login from the next, which is how a reused refresh token is recognised.
_REQUIRED_CLAIMS: Final = ["exp", "iat", "sub", "typ", "aud", "iss", "jti", "sid"]
_MAX_ID_LENGTH: Final = 32


class TokenInvalid(Exception):
    """A token that does not authenticate anyone; the message says why, never the token."""


@dataclass(frozen=True, slots=True)
class TokenPair:
    """An access token and a refresh token issued together, with their expiry."""

    access_token: str
    access_expires_at: dt.datetime
    refresh_token: str
    refresh_expires_at: dt.datetime
    login: str
    """The login (refresh family) both tokens belong to."""
    refresh_token_id: str
    """The refresh token's `jti`: the one the login's row must name for it to be usable."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid token says: whose it is, which kind (access or refresh), its expiry, the
    login it belongs to and its own id."""

    username: str
    token_type: str
    expires_at: dt.datetime
    login: str
    token_id: str


def load_jwt_secret(path: str) -> bytes:
    """The signing secret from `path` (surrounding whitespace ignored); with no path, a random
    secret for this process only, so tokens do not survive a restart nor work on another
    control plane. Raises ValueError for a secret shorter than 32 bytes."""
    if not path:
        log.warning(
            "no jwt_secret_file set: using a random per-process secret; tokens stop working "
            "on restart and are not accepted by other control planes"
        )
        return secrets.token_bytes(MIN_SECRET_BYTES)
    secret = pathlib.Path(path).read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"jwt_secret_file {path}: the secret must be at least {MIN_SECRET_BYTES} bytes"
        )
    return secret


class TokenIssuer:
    """Signs and checks the JWT access and refresh tokens of password users."""

    def __init__(
        self,
        secret: bytes,
        *,
        issuer: str,
        access_ttl_s: float,
        refresh_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._issuer = issuer
        self._access_ttl_s = access_ttl_s
        self._refresh_ttl_s = refresh_ttl_s
        self._clock = clock

    def _token(
        self, username: str, token_type: str, ttl_s: float, login: str, token_id: str
    ) -> tuple[str, dt.datetime]:
        now = int(self._clock())
        expires = now + max(int(ttl_s), 1)
        claims = {
            "iss": self._issuer,
            "aud": _AUDIENCE,
            "sub": username,
            "typ": token_type,
            "iat": now,
            "exp": expires,
            "sid": login,
            # Makes each token unique, so a rotated pair never equals the one it replaces.
            "jti": token_id,
        }
        token = jwt.encode(claims, self._secret, algorithm=_ALGORITHM)
        return token, dt.datetime.fromtimestamp(expires, dt.UTC)

    def issue(self, username: str, login: str | None = None) -> TokenPair:
        """A new access token and refresh token for `username`, of the login `login` (a new
        login id when None)."""
        login = login or uuid.uuid4().hex
        refresh_id = uuid.uuid4().hex
        access, access_expires = self._token(
            username, ACCESS, self._access_ttl_s, login, uuid.uuid4().hex
        )
        refresh, refresh_expires = self._token(
            username, REFRESH, self._refresh_ttl_s, login, refresh_id
        )
        return TokenPair(access, access_expires, refresh, refresh_expires, login, refresh_id)

    def verify_access(self, token: str) -> TokenClaims:
        return self._verify(token, ACCESS)

    def verify_refresh(self, token: str) -> TokenClaims:
        return self._verify(token, REFRESH)

    def _verify(self, token: str, token_type: str) -> TokenClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                issuer=self._issuer,
                options={"require": _REQUIRED_CLAIMS},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise TokenInvalid(f"the {token_type} token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid(f"invalid {token_type} token: {exc}") from None
        if claims.get("typ") != token_type:
            raise TokenInvalid(f"not a {token_type} token")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenInvalid(f"invalid {token_type} token: no subject")
        ids = [claims.get("sid"), claims.get("jti")]
        if not all(isinstance(i, str) and 0 < len(i) <= _MAX_ID_LENGTH for i in ids):
            raise TokenInvalid(f"invalid {token_type} token: no login id or token id")
        return TokenClaims(
            subject,
            token_type,
            dt.datetime.fromtimestamp(claims["exp"], dt.UTC),
            str(ids[0]),
            str(ids[1]),
        )
