"""How `sentinelctl` reaches a control plane: the --server, --certs-dir and --identity flags with
their environment defaults, and the mutual-TLS channel they describe."""

from __future__ import annotations

import argparse
import os
import pathlib

import grpc


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command shares; each defaults to its SENTINEL_* environment variable."""
    parser.add_argument("--server", default=os.environ.get("SENTINEL_SERVER", "localhost:7443"))
    parser.add_argument("--certs-dir", default=os.environ.get("SENTINEL_CERTS_DIR", ".dev/certs"))
    parser.add_argument(
        "--identity",
        default=os.environ.get("SENTINEL_IDENTITY", "operator-admin"),
        help="certificate stem in --certs-dir, e.g. operator-admin or viewer-readonly",
    )


def open_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A channel to --server that proves --identity with its key and certificate from
    --certs-dir and trusts only that directory's CA."""
    directory = pathlib.Path(args.certs_dir)
    credentials = grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(),
        (directory / f"{args.identity}.key").read_bytes(),
        (directory / f"{args.identity}.pem").read_bytes(),
    )
    return grpc.aio.secure_channel(args.server, credentials)
