"""The identity commands: bootstrap tokens for enrolling nodes (EnrollmentService), certificate
and node revocations, and password users (IdentityService)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from sentinel.v1 import enrollment_pb2, enrollment_pb2_grpc, identity_pb2, identity_pb2_grpc

from sentinelctl._connection import open_channel
from sentinelctl._values import duration, positive, utc_iso


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `token create`, `revoke`, `revocations`, `user add`, `user delete` and `users`."""
    token = sub.add_parser("token", help="bootstrap tokens for enrolling nodes")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a bootstrap token (printed once)")
    create.add_argument("--node", required=True, help="node name or glob, e.g. gpu-node-*")
    create.add_argument("--uses", type=positive, default=1, help="enrollments allowed (1)")
    create.add_argument(
        "--ttl", type=duration, default=None, help="lifetime, e.g. 30m (server default)"
    )
    create.set_defaults(func=_token_create)
    revoke = sub.add_parser("revoke", help="revoke a certificate (by serial) or a node")
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--serial", help="certificate serial in hex, as openssl prints it")
    what.add_argument("--node", help="node id: every certificate issued to it until now")
    revoke.add_argument("--reason")
    revoke.set_defaults(func=_revoke)
    sub.add_parser("revocations", help="list revocations").set_defaults(func=_revocations)
    user = sub.add_parser("user", help="users who log in with a password")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    user_add = user_sub.add_parser("add", help="create a user")
    user_add.add_argument("name")
    user_add.add_argument("--role", required=True, choices=("operator", "viewer"))
    user_add.set_defaults(func=_user_add)
    user_delete = user_sub.add_parser("delete", help="delete a user")
    user_delete.add_argument("name")
    user_delete.set_defaults(func=_user_delete)
    sub.add_parser("users", help="list users").set_defaults(func=_users)


async def _token_create(args: argparse.Namespace) -> None:
    request = enrollment_pb2.CreateBootstrapTokenRequest(node_pattern=args.node, max_uses=args.uses)
    if args.ttl is not None:
        request.ttl.CopyFrom(args.ttl)
    async with open_channel(args) as channel:
        response = await enrollment_pb2_grpc.EnrollmentServiceStub(channel).CreateBootstrapToken(
            request
        )
    expires = utc_iso(response.expire_time)
    # The token on stdout alone, so `TOKEN=$(sentinelctl token create ...)` works.
    print(response.token)
    print(
        f"token {response.token_id} for nodes {args.node!r}, {args.uses} use(s), expires "
        f"{expires}; it is shown only this once",
        file=sys.stderr,
    )


async def _revoke(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        reason = args.reason or ""
        response: identity_pb2.RevokeCertificateResponse | identity_pb2.RevokeNodeResponse
        if args.serial:
            response = await stub.RevokeCertificate(
                identity_pb2.RevokeCertificateRequest(serial=args.serial, reason=reason), timeout=10
            )
        else:
            response = await stub.RevokeNode(
                identity_pb2.RevokeNodeRequest(node_id=args.node, reason=reason), timeout=10
            )
    revocation = response.revocation
    print(
        f"revoked {revocation.kind} {revocation.value} at {utc_iso(revocation.revoke_time)}; "
        f"{response.sessions_closed} open session(s) closed"
    )


async def _revocations(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        token = ""
        print(f"{'KIND':<7} {'VALUE':<42} {'REVOKED':<26} {'BY':<40} REASON")
        while True:
            page = await stub.ListRevocations(
                identity_pb2.ListRevocationsRequest(page_token=token), timeout=10
            )
            for r in page.revocations:
                print(
                    f"{r.kind:<7} {r.value:<42} {utc_iso(r.revoke_time):<26} "
                    f"{r.revoked_by:<40} {r.reason}"
                )
            token = page.next_page_token
            if not token:
                return


async def _user_add(args: argparse.Namespace) -> None:
    password = os.environ.get("SENTINEL_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
    async with open_channel(args) as channel:
        response = await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
            identity_pb2.CreateUserRequest(username=args.name, role=args.role, password=password),
            timeout=10,
        )
    print(f"user {response.user.username} created with role {response.user.role}")


async def _user_delete(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).DeleteUser(
            identity_pb2.DeleteUserRequest(username=args.name), timeout=10
        )
    print(f"user {args.name} deleted")


async def _users(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListUsers(identity_pb2.ListUsersRequest(page_token=token), timeout=10)
            for user in page.users:
                print(f"{user.username:<40} {user.role:<9} created {utc_iso(user.create_time)}")
            token = page.next_page_token
            if not token:
                return
