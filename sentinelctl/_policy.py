"""The policy commands: list and show policies, `apply` a policy file (create what is new,
update what differs) and `test` one (the server checks it, nothing is stored), through
PolicyService."""

from __future__ import annotations

import argparse
import sys

import grpc
from sentinel.v1 import policy_pb2

from sentinelclient import SentinelClient, SentinelError, load_policies
from sentinelctl._output import add_output_argument, message_data, print_data, print_messages, table


class PolicyFileRefused(Exception):
    """`policy test` found policies the server would refuse (already printed)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `policy list|get|apply|test|delete`."""
    policy = sub.add_parser("policy", help="policies plans are checked against")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    listed = policy_sub.add_parser("list", help="list policies")
    add_output_argument(listed)
    listed.set_defaults(func=_list)
    get = policy_sub.add_parser("get", help="one policy (YAML unless -o says otherwise)")
    get.add_argument("policy_id")
    add_output_argument(get, default="yaml")
    get.set_defaults(func=_get)
    for name, func, text in (
        ("apply", _apply, "create or update the policies of a YAML or JSON file"),
        ("test", _test, "check the policies of a file on the server, storing nothing"),
    ):
        command = policy_sub.add_parser(name, help=text)
        command.add_argument("-f", "--file", required=True, help="policy file; - reads stdin")
        command.set_defaults(func=func)
    delete = policy_sub.add_parser("delete", help="delete a policy")
    delete.add_argument("policy_id")
    delete.set_defaults(func=_delete)


def _list(args: argparse.Namespace, client: SentinelClient) -> None:
    policies = client.list_policies()
    if args.output != "table":
        print_messages(policies, args.output)
        return
    rows = [
        (p.policy_id, "yes" if p.enabled else "no", len(p.rules), p.origin, p.description)
        for p in policies
    ]
    for line in table(("POLICY", "ENABLED", "RULES", "ORIGIN", "DESCRIPTION"), rows):
        print(line)


def _get(args: argparse.Namespace, client: SentinelClient) -> None:
    policy = client.get_policy(args.policy_id)
    if args.output != "table":
        print_data(message_data(policy), args.output)
        return
    print(f"policy   {policy.policy_id}  ({'enabled' if policy.enabled else 'disabled'})")
    print(f"origin   {policy.origin}")
    if policy.description:
        print(f"about    {policy.description}")
    rows = [
        (
            r.rule_id,
            policy_pb2.PolicyRuleScope.Name(r.scope).removeprefix("POLICY_RULE_SCOPE_"),
            policy_pb2.PolicyEffect.Name(r.effect).removeprefix("POLICY_EFFECT_"),
            r.field,
            r.expression,
        )
        for r in policy.rules
    ]
    for line in table(("RULE", "SCOPE", "EFFECT", "FIELD", "EXPRESSION"), rows):
        print(line)


def _stored(client: SentinelClient, policy_id: str) -> policy_pb2.Policy | None:
    try:
        return client.get_policy(policy_id)
    except SentinelError as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _comparable(policy: policy_pb2.Policy) -> policy_pb2.Policy:
    """What a file says of a policy: no origin or update time (the server's), and the
    defaults the server fills in for an unspecified effect (REJECT) and scope (PLAN)."""
    out = policy_pb2.Policy()
    out.CopyFrom(policy)
    out.ClearField("update_time")
    out.ClearField("origin")
    for rule in out.rules:
        rule.effect = rule.effect or policy_pb2.POLICY_EFFECT_REJECT
        rule.scope = rule.scope or policy_pb2.POLICY_RULE_SCOPE_PLAN
    return out


def _same(stored: policy_pb2.Policy, wanted: policy_pb2.Policy) -> bool:
    return _comparable(stored) == _comparable(wanted)


def _apply(args: argparse.Namespace, client: SentinelClient) -> None:
    for policy in load_policies(args.file):
        stored = _stored(client, policy.policy_id)
        if stored is None:
            client.create_policy(policy)
            print(f"policy {policy.policy_id} created")
        elif _same(stored, policy):
            print(f"policy {policy.policy_id} unchanged")
        else:
            client.update_policy(policy)
            print(f"policy {policy.policy_id} updated")


def _test(args: argparse.Namespace, client: SentinelClient) -> None:
    refused = 0
    for policy in load_policies(args.file):
        stored = _stored(client, policy.policy_id)
        try:
            if stored is None:
                client.create_policy(policy, validate_only=True)
                verdict = "would be created"
            elif _same(stored, policy):
                verdict = "is unchanged"
            else:
                client.update_policy(policy, validate_only=True)
                verdict = "would be updated"
        except SentinelError as exc:
            if exc.code not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS,
            ):
                raise
            refused += 1
            print(f"policy {policy.policy_id or '(no id)'}: refused ({exc.code.name})")
            rows = [(p.field, p.message) for p in exc.problems] or [("", exc.message)]
            for line in table(("FIELD", "PROBLEM"), rows):
                print(f"  {line}")
            continue
        print(f"policy {policy.policy_id}: valid, {verdict}")
    if refused:
        print(f"{refused} policy(ies) would be refused", file=sys.stderr)
        raise PolicyFileRefused


def _delete(args: argparse.Namespace, client: SentinelClient) -> None:
    client.delete_policy(args.policy_id)
    print(f"policy {args.policy_id} deleted")
