"""`IdentityService`: revoking certificates and nodes (closing their open sessions and streams
at once) and managing the users who log in with a password (deleting one ends its open streams
at once). Operators only, by the role table."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from sentinel.v1 import identity_pb2, identity_pb2_grpc

from controlplane.api import _convert, _paging
from controlplane.api._errors import abort
from controlplane.auth import current_principal
from controlplane.identity import (
    Revocation,
    RevocationInvalid,
    Revocations,
    User,
    UserAlreadyExists,
    UserInvalid,
    UserNotFound,
    Users,
)

log = logging.getLogger(__name__)


def revocation_message(revocation: Revocation) -> identity_pb2.Revocation:
    return identity_pb2.Revocation(
        kind=revocation.kind,
        value=revocation.value,
        reason=revocation.reason,
        revoke_time=_convert.timestamp(revocation.revoked_at),
        revoked_by=revocation.revoked_by,
    )


def user_message(user: User) -> identity_pb2.User:
    return identity_pb2.User(
        username=user.username, role=user.role, create_time=_convert.timestamp(user.created_at)
    )


class IdentityService(identity_pb2_grpc.IdentityServiceServicer):
    """Revocations and password users, for operators."""

    def __init__(
        self,
        revocations: Revocations,
        users: Users,
        close_revoked_sessions: Callable[[], int],
        cut_user_streams: Callable[[str], int] = lambda _username: 0,
    ) -> None:
        self._revocations = revocations
        self._users = users
        # Closes the agent sessions and cuts the open streams that the revocations now refuse;
        # returns how many agent sessions it closed.
        self._close_revoked_sessions = close_revoked_sessions
        self._cut_user_streams = cut_user_streams

    async def RevokeCertificate(
        self, request: identity_pb2.RevokeCertificateRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.RevokeCertificateResponse:
        try:
            revocation = await self._revocations.revoke_serial(
                request.serial, request.reason, current_principal().spiffe_id
            )
        except RevocationInvalid as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        closed = self._close_revoked_sessions()
        return identity_pb2.RevokeCertificateResponse(
            revocation=revocation_message(revocation), sessions_closed=closed
        )

    async def RevokeNode(
        self, request: identity_pb2.RevokeNodeRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.RevokeNodeResponse:
        try:
            revocation = await self._revocations.revoke_node(
                request.node_id, request.reason, current_principal().spiffe_id
            )
        except RevocationInvalid as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        closed = self._close_revoked_sessions()
        return identity_pb2.RevokeNodeResponse(
            revocation=revocation_message(revocation), sessions_closed=closed
        )

    async def ListRevocations(
        self, request: identity_pb2.ListRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListRevocationsResponse:
        try:
            page, token = _paging.paginate(
                self._revocations.list(),
                lambda r: f"{r.kind}/{r.value}",
                request.page_size,
                request.page_token,
            )
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return identity_pb2.ListRevocationsResponse(
            revocations=[revocation_message(r) for r in page], next_page_token=token
        )

    async def CreateUser(
        self, request: identity_pb2.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CreateUserResponse:
        try:
            user = await self._users.create(request.username, request.role, request.password)
        except UserInvalid as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UserAlreadyExists as exc:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        log.info("user %s created with role %s", user.username, user.role)
        return identity_pb2.CreateUserResponse(user=user_message(user))

    async def DeleteUser(
        self, request: identity_pb2.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.DeleteUserResponse:
        if not request.username:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "username: required")
        try:
            await self._users.delete(request.username)
        except UserInvalid as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UserNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"username: {exc}")
        cut = self._cut_user_streams(request.username)
        log.info("user %s deleted (%d open stream(s) cut)", request.username, cut)
        return identity_pb2.DeleteUserResponse()

    async def ListUsers(
        self, request: identity_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListUsersResponse:
        try:
            page, token = _paging.paginate(
                await self._users.list(),
                lambda u: u.username,
                request.page_size,
                request.page_token,
            )
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return identity_pb2.ListUsersResponse(
            users=[user_message(u) for u in page], next_page_token=token
        )
