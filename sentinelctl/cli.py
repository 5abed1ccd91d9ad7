"""`sentinelctl`: the operator's command line for a running control plane.

sentinelctl agents                  list agents and their liveness
sentinelctl agent NODE              one agent in full (JSON)
sentinelctl telemetry [--node N]    latest sample per node, one line each
sentinelctl telemetry --follow      live samples as they arrive
sentinelctl audit [--principal P] [--method M] [--target T] [--limit N]
                                    recent audit events, newest first
sentinelctl submit FILE [--validate-only]
                                    submit a plan (JSON, the sentinel.v1.Plan message)
sentinelctl plans [--phase P] [--target T]
                                    list plans, oldest first
sentinelctl plan ID                 one plan in full (JSON)
sentinelctl watch ID                follow a plan's transitions until it ends
sentinelctl approve ID [--reason R] / sentinelctl cancel ID [--reason R]
sentinelctl token create --node PATTERN [--uses N] [--ttl 30m]
                                    a bootstrap token for enrolling nodes (printed once)
sentinelctl revoke --serial S | --node N [--reason R]
                                    revoke a certificate or every certificate of a node
sentinelctl revocations             list revocations
sentinelctl user add NAME --role operator|viewer
                                    create a password user (password from a prompt or
                                    SENTINEL_PASSWORD)
sentinelctl user delete NAME / sentinelctl users
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from google.protobuf import json_format

from sentinelctl import _audit, _fleet, _identity, _plans
from sentinelctl._connection import add_connection_arguments
from sentinelctl._values import duration

# The --ttl parser under the name it had when it lived here; tests reach it as `cli._duration`.
_duration = duration


def main(argv: list[str] | None = None) -> int:
    """Runs one command; exits 0, 1 on an RPC error, 2 on bad input or a missing file, 130 on
    Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="sentinelctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    # Registration order is the order `--help` lists the commands in.
    for commands in (_fleet, _audit, _plans, _identity):
        commands.register(sub)
    args = parser.parse_args(argv)
    try:
        asyncio.run(args.func(args))
    except grpc.aio.AioRpcError as exc:
        print(f"sentinelctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except json_format.ParseError as exc:
        print(f"sentinelctl: {args.file}: not a sentinel.v1.Plan in JSON: {exc}", file=sys.stderr)
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
