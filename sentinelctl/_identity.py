"""The identity commands: password login, bootstrap tokens for enrolling nodes
(EnrollmentService), certificate and node revocations, and password users (IdentityService)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from sentinel.v1 import identity_pb2

from sentinelclient import SentinelClient
from sentinelctl._output import add_output_argument, print_messages
from sentinelctl._values import duration, positive, utc_iso


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `login`, `token create`, `revoke`, `revocations`, `user add`, `user delete` and
    `users`."""
    login = sub.add_parser("login", help="log a password user in; prints an access token")
    login.add_argument("name")
    login.set_defaults(func=_login)
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
    revocations = sub.add_parser("revocations", help="list revocations")
    add_output_argument(revocations)
    revocations.set_defaults(func=_revocations)
    user = sub.add_parser("user", help="users who log in with a password")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    user_add = user_sub.add_parser("add", help="create a user")
    user_add.add_argument("name")
    user_add.add_argument("--role", required=True, choices=("operator", "viewer"))
    user_add.set_defaults(func=_user_add)
    user_delete = user_sub.add_parser("delete", help="delete a user")
    user_delete.add_argument("name")
    user_delete.set_defaults(func=_user_delete)
    users = sub.add_parser("users", help="list users")
    add_output_argument(users)
    users.set_defaults(func=_users)


def _password(name: str) -> str:
    return os.environ.get("SENTINEL_PASSWORD") or getpass.getpass(f"password for {name}: ")


def _login(args: argparse.Namespace, client: SentinelClient) -> None:
    response = client.login(args.name, _password(args.name))
    # The token alone on stdout, so `export SENTINEL_TOKEN=$(sentinelctl login alice)` works.
    print(response.access_token)
    print(
        f"logged in as {args.name}; the access token expires "
        f"{utc_iso(response.access_token_expire_time)}",
        file=sys.stderr,
    )


def _token_create(args: argparse.Namespace, client: SentinelClient) -> None:
    ttl_s = args.ttl.ToTimedelta().total_seconds() if args.ttl is not None else None
    response = client.create_bootstrap_token(args.node, max_uses=args.uses, ttl_s=ttl_s)
    expires = utc_iso(response.expire_time)
    # The token on stdout alone, so `TOKEN=$(sentinelctl token create ...)` works.
    print(response.token)
    print(
        f"token {response.token_id} for nodes {args.node!r}, {args.uses} use(s), expires "
        f"{expires}; it is shown only this once",
        file=sys.stderr,
    )


def _revoke(args: argparse.Namespace, client: SentinelClient) -> None:
    reason = args.reason or ""
    response: identity_pb2.RevokeCertificateResponse | identity_pb2.RevokeNodeResponse
    if args.serial:
        response = client.revoke_certificate(args.serial, reason)
    else:
        response = client.revoke_node(args.node, reason)
    revocation = response.revocation
    print(
        f"revoked {revocation.kind} {revocation.value} at {utc_iso(revocation.revoke_time)}; "
        f"{response.sessions_closed} open session(s) closed"
    )


def _revocations(args: argparse.Namespace, client: SentinelClient) -> None:
    revocations = client.list_revocations()
    if args.output != "table":
        print_messages(revocations, args.output)
        return
    print(f"{'KIND':<7} {'VALUE':<42} {'REVOKED':<26} {'BY':<40} REASON")
    for r in revocations:
        print(
            f"{r.kind:<7} {r.value:<42} {utc_iso(r.revoke_time):<26} {r.revoked_by:<40} {r.reason}"
        )


def _user_add(args: argparse.Namespace, client: SentinelClient) -> None:
    user = client.create_user(args.name, args.role, _password(args.name))
    print(f"user {user.username} created with role {user.role}")


def _user_delete(args: argparse.Namespace, client: SentinelClient) -> None:
    client.delete_user(args.name)
    print(f"user {args.name} deleted")


def _users(args: argparse.Namespace, client: SentinelClient) -> None:
    users = client.list_users()
    if args.output != "table":
        print_messages(users, args.output)
        return
    for user in users:
        print(f"{user.username:<40} {user.role:<9} created {utc_iso(user.create_time)}")
