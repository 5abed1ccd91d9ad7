"""Where a client connects and how it proves who it is: the connection settings, the TLS files
they name (explicitly or as `<identity>.pem` / `.key` next to `ca.pem` in a certificates
directory), the bearer token, the retry policy, and the SENTINEL_* environment that fills
them."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The three PEM files of a mutual-TLS connection."""

    ca: pathlib.Path
    """CA bundle the server's certificate must chain to."""
    cert: pathlib.Path
    """The client's certificate (its SPIFFE id names its role)."""
    key: pathlib.Path
    """The client's private key."""

    @classmethod
    def from_directory(cls, directory: pathlib.Path | str, identity: str) -> TlsFiles:
        """The layout `sentinel-certs init` writes: `ca.pem`, `<identity>.pem`, `<identity>.key`."""
        base = pathlib.Path(directory)
        return cls(base / "ca.pem", base / f"{identity}.pem", base / f"{identity}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, key, certificate) bytes; FileNotFoundError names a missing file."""
        return self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When a call that is safe to repeat is repeated: bounded attempts, capped exponential
    backoff with full jitter, and the server's own retry delay where it sends one."""

    max_attempts: int = 5
    """Attempts in all, the first included; 1 turns retries off."""
    initial_backoff_s: float = 0.2
    """Cap of the first retry's random delay."""
    max_backoff_s: float = 5.0
    """Largest cap a retry's random delay grows to."""
    multiplier: float = 2.0
    """Growth of the cap from one retry to the next."""
    max_server_delay_s: float = 30.0
    """A server asking for a longer wait (`retry-after-ms`) gets the error back instead."""


DEFAULT_CERTS_DIR = pathlib.Path(".dev/certs")
DEFAULT_IDENTITY = "operator-admin"


@dataclasses.dataclass(frozen=True)
class ConnectionSettings:
    """How to reach one control plane: address, mutual-TLS identity, bearer token, deadlines
    and retries. `from_environment` fills it from SENTINEL_* variables."""

    server: str = "localhost:7443"
    """host:port of the control plane's API."""
    certs_dir: pathlib.Path = DEFAULT_CERTS_DIR
    """Directory with ca.pem and <identity>.pem/.key (as `sentinel-certs init` makes it)."""
    identity: str = DEFAULT_IDENTITY
    """Certificate stem in certs_dir, e.g. operator-admin, planner-inframind."""
    ca: pathlib.Path | None = None
    """CA bundle file; overrides certs_dir/ca.pem."""
    cert: pathlib.Path | None = None
    """Client certificate file; overrides certs_dir/<identity>.pem."""
    key: pathlib.Path | None = None
    """Client key file; overrides certs_dir/<identity>.key."""
    token: str = dataclasses.field(default="", repr=False)
    """Bearer access token (from `AuthService/Login`); the call then runs as that user."""
    token_file: pathlib.Path | None = None
    """File holding the bearer access token; read when the client starts."""
    tls_server_name: str = ""
    """Name to check the server's certificate against when it differs from the address."""
    timeout_s: float = 10.0
    """Deadline of one attempt of a unary call."""
    keepalive_time_s: float = 30.0
    """Ping interval while a call (a watch, a telemetry stream) is open."""
    retry: RetryPolicy = RetryPolicy()
    """Retries of calls that are safe to repeat."""

    def tls_files(self) -> TlsFiles:
        """Explicit files where given, the certificates directory's otherwise."""
        derived = TlsFiles.from_directory(self.certs_dir, self.identity)
        return TlsFiles(self.ca or derived.ca, self.cert or derived.cert, self.key or derived.key)

    def bearer_token(self) -> str:
        """The access token to send: `token`, else the contents of `token_file`, else ''."""
        if self.token:
            return self.token.strip()
        if self.token_file is not None:
            return self.token_file.read_text(encoding="utf-8").strip()
        return ""

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ConnectionSettings:
        """Settings from the SENTINEL_* variables (`ENVIRONMENT`), then `overrides` (e.g.
        command-line flags); an override of None leaves the environment's value."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            if env.get(variable):
                values[name] = env[variable]
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("certs_dir", "ca", "cert", "key", "token_file"):
            if isinstance(values.get(name), str):
                values[name] = pathlib.Path(values[name])
        return cls(**values)


ENVIRONMENT = {
    "server": "SENTINEL_SERVER",
    "certs_dir": "SENTINEL_CERTS_DIR",
    "identity": "SENTINEL_IDENTITY",
    "ca": "SENTINEL_CA",
    "cert": "SENTINEL_CERT",
    "key": "SENTINEL_KEY",
    "token": "SENTINEL_TOKEN",
    "token_file": "SENTINEL_TOKEN_FILE",
    "tls_server_name": "SENTINEL_TLS_SERVER_NAME",
}
"""The environment variable of each setting that has one."""
