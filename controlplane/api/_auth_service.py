"""`AuthService`: password login and token refresh for human users. Logins are rate-limited per
user and per address, and a failed one never tells whether the user exists. Refresh rotates the
refresh token; reusing an old one revokes the whole login (`identity/_logins.py`)."""

from __future__ import annotations

import logging
import math

import grpc
from sentinel.v1 import auth_pb2, auth_pb2_grpc

from controlplane.api import _convert
from controlplane.api._errors import abort
from controlplane.auth import RateLimiter
from controlplane.identity import InvalidCredentials, Logins, TokenInvalid, TokenPair, Users

log = logging.getLogger(__name__)

# One address may carry several people (a bastion host, a NAT), so it gets more attempts than
# one user; both limits still bound password guessing.
ADDRESS_RATE_FACTOR = 4
_LOGIN_FAILED = "invalid username or password"


def _address(peer: str) -> str:
    """The host part of a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`)."""
    host = peer.partition(":")[2] or peer
    return host.rpartition(":")[0] or host


def _pair_fields(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "access_token_expire_time": _convert.timestamp(pair.access_expires_at),
        "refresh_token_expire_time": _convert.timestamp(pair.refresh_expires_at),
    }


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    """Password login and token refresh for human operators."""

    def __init__(self, users: Users, logins: Logins, login_rate_per_minute: float) -> None:
        self._users = users
        self._logins = logins
        self._per_user = RateLimiter(login_rate_per_minute)
        self._per_address = RateLimiter(login_rate_per_minute * ADDRESS_RATE_FACTOR)

    async def _limit(self, username: str, context: grpc.aio.ServicerContext) -> None:
        wait_s = max(
            self._per_user.acquire(username), self._per_address.acquire(_address(context.peer()))
        )
        if wait_s > 0:
            wait_ms = math.ceil(wait_s * 1000)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many login attempts: retry in {wait_s:.1f} s",
                (("retry-after-ms", str(wait_ms)),),
            )
            raise AssertionError("unreachable: context.abort raises")

    async def Login(
        self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LoginResponse:
        # The username is bounded before it becomes a rate-limiter key.
        await self._limit(request.username[:128], context)
        try:
            user = await self._users.verify_password(request.username, request.password)
        except InvalidCredentials:
            log.warning("failed login from %s", _address(context.peer()))
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, _LOGIN_FAILED)
        log.info("user %s logged in", user.username)
        pair = await self._logins.start(user.username)
        return auth_pb2.LoginResponse(**_pair_fields(pair))  # type: ignore[arg-type]

    async def Refresh(
        self, request: auth_pb2.RefreshRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RefreshResponse:
        try:
            pair = await self._logins.refresh(request.refresh_token)
        except TokenInvalid as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"refresh_token: {exc}")
        return auth_pb2.RefreshResponse(**_pair_fields(pair))  # type: ignore[arg-type]
