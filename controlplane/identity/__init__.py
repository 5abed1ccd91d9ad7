"""Identity lifecycle of the control plane: revoked certificates and nodes, human users with
passwords, and the short-lived tokens they log in with."""

from controlplane.identity._access_tokens import (
    ACCESS,
    REFRESH,
    TokenClaims,
    TokenInvalid,
    TokenIssuer,
    TokenPair,
    load_jwt_secret,
)
from controlplane.identity._logins import LoginRevoked, Logins, LoginUser
from controlplane.identity._revocations import (
    KIND_NODE,
    KIND_SERIAL,
    Revocation,
    RevocationInvalid,
    Revocations,
    normalize_serial,
)
from controlplane.identity._sessions import close_revoked_sessions
from controlplane.identity._streams import OpenStream, OpenStreams
from controlplane.identity._users import (
    MIN_PASSWORD_LENGTH,
    USER_ROLES,
    InvalidCredentials,
    User,
    UserAlreadyExists,
    UserInvalid,
    UserNotFound,
    Users,
)

__all__ = [
    "ACCESS",
    "KIND_NODE",
    "KIND_SERIAL",
    "MIN_PASSWORD_LENGTH",
    "REFRESH",
    "USER_ROLES",
    "InvalidCredentials",
    "LoginRevoked",
    "LoginUser",
    "Logins",
    "OpenStream",
    "OpenStreams",
    "Revocation",
    "RevocationInvalid",
    "Revocations",
    "TokenClaims",
    "TokenInvalid",
    "TokenIssuer",
    "TokenPair",
    "User",
    "UserAlreadyExists",
    "UserInvalid",
    "UserNotFound",
    "Users",
    "close_revoked_sessions",
    "load_jwt_secret",
    "normalize_serial",
]
