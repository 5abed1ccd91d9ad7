"""`sentinelctl`: the operator's command line for a running control plane.

sentinelctl agents [--status S]     list agents and their liveness
sentinelctl agent NODE              one agent in full (JSON)
sentinelctl telemetry [--node N]    latest sample per node, one line each
sentinelctl telemetry --follow      live samples as they arrive
sentinelctl audit [--principal P] [--method M] [--target T] [--limit N]
                                    recent audit events, newest first
sentinelctl plan submit -f FILE [--request-id ID]
                                    submit a plan (YAML or JSON, the sentinel.v1.Plan message)
sentinelctl plan validate -f FILE   verdict, commands and dry-run changes; stores nothing
sentinelctl submit FILE [--validate-only]
                                    the same, older spelling
sentinelctl plans [--phase P] [--target T]
                                    list plans, oldest first
sentinelctl plan ID / plan get ID   one plan in full (JSON)
sentinelctl plan outcome ID         what a plan did: each target's metrics before and after,
                                    the prediction verdicts, the time to effect
sentinelctl watch ID                follow a plan step by step until it ends
sentinelctl approve ID [--reason R] / sentinelctl cancel ID [--reason R]
sentinelctl autonomy                the autonomy breaker, disruption budgets with their
                                    holders, and each plan source's calibration
sentinelctl calibration SOURCE      how often one source's predictions came true
sentinelctl breaker reset --reason R
                                    close a tripped autonomy breaker (operators)
sentinelctl policy list / get ID / delete ID
sentinelctl policy apply -f FILE    create or update the policies in a YAML or JSON file
sentinelctl policy test -f FILE     check them on the server, storing nothing
sentinelctl login NAME              log a password user in; prints an access token for
                                    SENTINEL_TOKEN or --token-file
sentinelctl token create --node PATTERN [--uses N] [--ttl 30m]
                                    a bootstrap token for enrolling nodes (printed once)
sentinelctl revoke --serial S | --node N [--reason R]
                                    revoke a certificate or every certificate of a node
sentinelctl revocations             list revocations
sentinelctl user add NAME --role operator|viewer
                                    create a password user (password from a prompt or
                                    SENTINEL_PASSWORD)
sentinelctl user delete NAME / sentinelctl users
sentinelctl completion bash|zsh     print a shell completion script

Read commands take -o table|json|yaml.
"""

from __future__ import annotations

import argparse
import sys

from sentinelclient import DocumentError, SentinelError
from sentinelctl import _audit, _autonomy, _completion, _fleet, _identity, _plans, _policy
from sentinelctl._connection import add_connection_arguments, open_client
from sentinelctl._values import duration

# The --ttl parser under the name it had when it lived here; tests reach it as `cli._duration`.
_duration = duration


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, as `--help` and the completion scripts describe it."""
    parser = argparse.ArgumentParser(
        prog="sentinelctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    # Registration order is the order `--help` lists the commands in.
    for commands in (_fleet, _audit, _plans, _autonomy, _policy, _identity, _completion):
        commands.register(sub)
    return parser


def _with_plan_get(argv: list[str]) -> list[str]:
    """`plan ID` as it always worked: `plan get ID`."""
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = "=" not in word and word not in ("-h", "--help")
            continue
        if word != "plan" or i + 1 >= len(argv):
            return argv
        following = argv[i + 1]
        if following.startswith("-") or following in _plans.PLAN_COMMANDS:
            return argv
        return [*argv[: i + 1], "get", *argv[i + 1 :]]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Runs one command; exits 0, 1 on an RPC error (or a policy file the server would
    refuse), 2 on bad input or a missing file, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(_with_plan_get(sys.argv[1:] if argv is None else argv))
    try:
        if getattr(args, "offline", False):
            args.func(args, parser)
            return 0
        with open_client(args) as client:
            args.func(args, client)
    except SentinelError as exc:
        print(f"sentinelctl: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    except _policy.PolicyFileRefused:
        return 1
    except DocumentError as exc:
        print(f"sentinelctl: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(
            f"sentinelctl: {exc.filename}: no such file (see `sentinel-certs init`)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
