"""Server TLS from files, re-read when they change on disk, without a restart.

`grpc.dynamic_ssl_server_credentials` consults the fetch callback on new handshakes; returning a
new configuration there rotates the serving certificate and the client CA for new connections
while open sessions keep theirs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.settings import TlsFiles

log = logging.getLogger(__name__)


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Refuses a key that does not belong to the certificate: during a rotation the two files
    are written one after the other, and a handshake must never see half of each."""
    public = serialization.load_pem_private_key(key_pem, password=None).public_key()
    expected = x509.load_pem_x509_certificate(cert_pem).public_key()
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(encoding, fmt) != expected.public_bytes(encoding, fmt):
        raise ValueError("the TLS key does not match the certificate")


def certificate_expiry(cert_pem: bytes, ca_pem: bytes) -> dict[str, float]:
    """When the serving certificate and the CA bundle's soonest certificate expire (unix)."""
    server = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
    bundle = [c.not_valid_after_utc.timestamp() for c in x509.load_pem_x509_certificates(ca_pem)]
    return {"server": server, "ca": min(bundle)} if bundle else {"server": server}


class ReloadingServerCredentials:
    """Server TLS credentials that re-read changed certificate files at the next handshake."""

    def __init__(
        self, files: TlsFiles, on_loaded: Callable[[dict[str, float]], None] | None = None
    ) -> None:
        self._on_loaded = on_loaded
        self._files = files
        self._stamp = self._read_stamp()
        self._config = self._load()

    def _read_stamp(self) -> tuple[float, ...]:
        return tuple(
            os.stat(p).st_mtime_ns for p in (self._files.ca, self._files.cert, self._files.key)
        )

    def _load(self) -> grpc.ServerCertificateConfiguration:
        try:
            ca = self._files.ca.read_bytes()
            cert = self._files.cert.read_bytes()
            key = self._files.key.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read TLS files: {exc}") from exc
        for label, pem, marker in (
            ("CA", ca, b"-----BEGIN CERTIFICATE-----"),
            ("certificate", cert, b"-----BEGIN CERTIFICATE-----"),
            ("key", key, b"PRIVATE KEY-----"),
        ):
            if marker not in pem:
                raise ValueError(f"TLS {label} file holds no PEM {label}")
        _check_pair(cert, key)
        if self._on_loaded is not None:
            self._on_loaded(certificate_expiry(cert, ca))
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return None
            config = self._load()
        except (OSError, ValueError) as exc:
            # A half-written rotation keeps the old certificate rather than breaking handshakes.
            log.warning(
                "TLS files changed but cannot be loaded yet (%s); keeping the old ones", exc
            )
            return None
        self._stamp = stamp
        self._config = config
        log.info("TLS certificate or CA changed on disk: reloaded")
        return config

    def credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Server credentials that follow the files; `require_client_auth=False` serves the
        enrollment port, whose callers have no certificate yet. Use one instance per server:
        each notices a change on disk once."""
        return grpc.dynamic_ssl_server_credentials(
            self._config, self._fetch, require_client_authentication=require_client_auth
        )
