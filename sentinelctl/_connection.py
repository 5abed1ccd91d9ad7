"""How `sentinelctl` reaches a control plane: the connection flags, which map onto
`sentinelclient.ConnectionSettings` (each defaults to its SENTINEL_* variable there), and the
client they describe."""

from __future__ import annotations

import argparse

from sentinelclient import ENVIRONMENT, ConnectionSettings, SentinelClient

_FLAGS = (
    ("--server", "server", "control plane address (default localhost:7443)"),
    ("--certs-dir", "certs_dir", "directory with ca.pem and <identity>.pem/.key (.dev/certs)"),
    ("--identity", "identity", "certificate stem in --certs-dir, e.g. operator-admin (default)"),
    ("--ca", "ca", "CA bundle file (instead of --certs-dir/ca.pem)"),
    ("--cert", "cert", "client certificate file (instead of --certs-dir/<identity>.pem)"),
    ("--key", "key", "client key file (instead of --certs-dir/<identity>.key)"),
    ("--token-file", "token_file", "file with a bearer access token (from `sentinelctl login`)"),
    ("--tls-server-name", "tls_server_name", "name the server's certificate must carry"),
)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command shares; unset, each takes its SENTINEL_* environment variable,
    then the library's default. A bearer token can also come from SENTINEL_TOKEN."""
    for flag, name, text in _FLAGS:
        parser.add_argument(flag, dest=name, default=None, help=f"{text}; ${ENVIRONMENT[name]}")


def connection_settings(args: argparse.Namespace) -> ConnectionSettings:
    """The settings the flags and the environment describe."""
    return ConnectionSettings.from_environment(
        **{name: getattr(args, name) for _, name, _ in _FLAGS}
    )


def open_client(args: argparse.Namespace) -> SentinelClient:
    """A client of --server proving --identity (or the explicit files) and the bearer token."""
    return SentinelClient(connection_settings(args))
