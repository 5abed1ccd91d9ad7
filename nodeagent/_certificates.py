"""The agent's certificate lifecycle: enrolls with a bootstrap token when it has no valid
certificate, renews over its current identity at a jittered 70-90 % of the certificate's life,
and replaces the files atomically so the next connection uses the new certificate.

A renewal never touches the open session: TLS checks a certificate at the handshake only.

Reading the certificate (serial, validity, SPIFFE id) needs only Python's own `ssl`, which
asyncio loads anyway; `cryptography` (about 8 MB of the agent's memory) is imported when a key
and CSR are made or an issued certificate is checked, i.e. at enrollment and renewal only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import pathlib
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from sentinel.v1 import agent_pb2, agent_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc

from nodeagent.settings import AgentSettings

if TYPE_CHECKING:
    from certs import Identity

log = logging.getLogger(__name__)

DEFAULT_ENROLLMENT_PORT = 7444
RENEW_AT_FRACTIONS = (0.7, 0.9)


class CertificateProblem(Exception):
    """An issued certificate that does not fit the key it was requested for, or this node."""


@dataclass(frozen=True, slots=True)
class CurrentCertificate:
    """The agent's certificate as read from disk: serial, validity and identity."""

    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    spiffe_id: str
    """The certificate's URI SAN when it has exactly one ('' otherwise)."""

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    @property
    def identity(self) -> Identity | None:
        """Who the certificate speaks for; None when its URI is not a Sentinel SPIFFE id."""
        # Here, not at the top: `certs` loads cryptography, which only renewal needs.
        from certs import IdentityError, parse_spiffe_id

        if not self.spiffe_id:
            return None
        try:
            return parse_spiffe_id(self.spiffe_id)
        except IdentityError:
            return None


def enrollment_endpoint(settings: AgentSettings) -> str:
    """The enrollment port's address: the setting, or the control plane's host on 7444."""
    if settings.enrollment_endpoint:
        return settings.enrollment_endpoint
    host, _, _port = settings.control_plane.rpartition(":")
    return f"{host or settings.control_plane}:{DEFAULT_ENROLLMENT_PORT}"


def bootstrap_token(settings: AgentSettings) -> str:
    """The configured bootstrap token ('' when none); the file is re-read on every call, so
    an operator can drop a fresh token in without restarting the agent."""
    if settings.bootstrap_token:
        return settings.bootstrap_token.strip()
    if settings.bootstrap_token_file:
        try:
            return pathlib.Path(settings.bootstrap_token_file).read_text().strip()
        except OSError as exc:
            log.error("cannot read the bootstrap token file: %s", exc.strerror or exc)
    return ""


def read_certificate(path: pathlib.Path) -> CurrentCertificate | None:
    """The certificate at `path`, or None when it is missing or unreadable."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return _read_certificate_with_cryptography(path)
    try:
        # The decoder behind SSLSocket.getpeercert(), fed from a PEM file: the same dict.
        fields: dict[str, Any] = decode(os.fspath(path))
        uris = [value for kind, value in fields.get("subjectAltName", ()) if kind == "URI"]
        return CurrentCertificate(
            int(fields["serialNumber"], 16),
            _certificate_time(fields["notBefore"]),
            _certificate_time(fields["notAfter"]),
            uris[0] if len(uris) == 1 else "",
        )
    except (OSError, ValueError, KeyError):
        return None


def _certificate_time(text: str) -> dt.datetime:
    """An X.509 time as the ssl module writes it ("Nov 30 15:32:06 2027 GMT"), in UTC."""
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(text), dt.UTC)


def _read_certificate_with_cryptography(path: pathlib.Path) -> CurrentCertificate | None:
    """`read_certificate` for a Python whose ssl module has no certificate-file decoder."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return CurrentCertificate(
        cert.serial_number,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        uris[0] if len(uris) == 1 else "",
    )


def _write_atomically(path: pathlib.Path, data: bytes, mode: int) -> pathlib.Path:
    """Writes `data` to a temporary file beside `path` (to rename over it); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return temporary


def _spki(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class CertificateKeeper:
    """Keeps a valid client certificate on disk; `ready` is set while there is one."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        mtls_credentials: Callable[[], grpc.ChannelCredentials],
        channel_options: Callable[[], list[tuple[str, int | str]]],
        rng: random.Random,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._settings = settings
        self._mtls_credentials = mtls_credentials
        self._channel_options = channel_options
        self._rng = rng
        self._clock = clock
        self.ready = asyncio.Event()
        self.files_lock = asyncio.Lock()
        """Held while the key and certificate are replaced; readers of the pair take it too."""
        self.current: CurrentCertificate | None = None
        self.renewals = 0
        self.enrollments = 0
        self._renew_at: tuple[int, dt.datetime] | None = None

    @property
    def valid(self) -> bool:
        return self.current is not None and self._clock() < self.current.not_after

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        s = self._settings
        attempt = 0
        while True:
            current = await asyncio.to_thread(read_certificate, s.cert)
            key_present = await asyncio.to_thread(s.key.exists)
            now = self._clock()
            if current is not None and key_present and now < current.not_after:
                self.current = current
                self.ready.set()
                renew_at = self._renewal_time(current)
                wait_s = (renew_at - now).total_seconds()
                if attempt:
                    wait_s = self._backoff(attempt)
                # Wake at expiry at the latest: past it, only re-enrollment can help.
                wait_s = min(wait_s, (current.not_after - now).total_seconds())
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if self._clock() >= current.not_after:
                    continue
                try:
                    await self._renew(current)
                    attempt = 0
                except Exception as exc:
                    attempt += 1
                    log.warning(
                        "certificate renewal failed (%s); the current certificate stays in use "
                        "until %s, retrying",
                        _describe(exc),
                        current.not_after.isoformat(),
                    )
                continue
            self.ready.clear()
            self.current = current
            why = (
                "is missing"
                if current is None or not key_present
                else f"expired at {current.not_after.isoformat()}"
            )
            token = await asyncio.to_thread(bootstrap_token, s)
            delay_s: float | None = None
            if token:
                try:
                    await self._enroll(token)
                    attempt = 0
                    continue
                except Exception as exc:
                    delay_s = _retry_after(exc)
                    log.error(
                        "the client certificate %s %s and enrollment failed: %s",
                        s.cert,
                        why,
                        _describe(exc),
                    )
            else:
                log.error(
                    "the client certificate %s %s and no bootstrap token is configured: the "
                    "agent cannot connect until it gets new certificate files or a token "
                    "(--bootstrap-token or --bootstrap-token-file)",
                    s.cert,
                    why,
                )
            attempt += 1
            await asyncio.sleep(delay_s if delay_s is not None else self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        return self._rng.uniform(
            s.backoff_base_s / 2, min(s.backoff_cap_s, s.backoff_base_s * 2**attempt)
        )

    def _renewal_time(self, current: CurrentCertificate) -> dt.datetime:
        """A jittered point at 70-90 % of the certificate's life, drawn once per certificate,
        so a fleet enrolled together does not renew together."""
        if self._renew_at is None or self._renew_at[0] != current.serial:
            fraction = self._rng.uniform(*RENEW_AT_FRACTIONS)
            self._renew_at = (current.serial, current.not_before + current.lifetime * fraction)
        return self._renew_at[1]

    # -- enrollment and renewal ------------------------------------------------------------------

    # cryptography and `certs` (which loads it) are imported where keys and certificates are
    # made or checked, so an agent that is not renewing does not carry them.

    async def _enroll(self, token: str) -> None:
        from certs import Identity, make_key_and_csr

        s = self._settings
        identity = Identity(s.trust_domain, "agent", s.node_id)
        key_pem, csr_pem = await asyncio.to_thread(make_key_and_csr, identity)
        # Server-only TLS: the CA file (distributed with the token) authenticates the server.
        ca_pem = await asyncio.to_thread(s.ca.read_bytes)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        endpoint = enrollment_endpoint(s)
        log.info("enrolling at %s with a bootstrap token", endpoint)
        async with grpc.aio.secure_channel(endpoint, credentials, self._channel_options()) as ch:
            response = await enrollment_pb2_grpc.EnrollmentServiceStub(ch).Enroll(
                enrollment_pb2.EnrollRequest(
                    token=token, node_id=s.node_id, csr_pem=csr_pem.decode()
                ),
                timeout=s.connect_timeout_s,
            )
        await self._install(key_pem, response.certificate_pem.encode())
        self.enrollments += 1
        log.info("enrolled: certificate valid until %s", self._not_after())

    async def _renew(self, current: CurrentCertificate) -> None:
        from certs import Identity, make_key_and_csr

        s = self._settings
        identity = current.identity or Identity(s.trust_domain, "agent", s.node_id)
        key_pem, csr_pem = await asyncio.to_thread(make_key_and_csr, identity)
        async with self.files_lock:
            credentials = await asyncio.to_thread(self._mtls_credentials)
        async with grpc.aio.secure_channel(
            s.control_plane, credentials, self._channel_options()
        ) as channel:
            response = await agent_pb2_grpc.AgentServiceStub(channel).RenewCertificate(
                agent_pb2.RenewCertificateRequest(csr_pem=csr_pem.decode()),
                timeout=s.connect_timeout_s,
            )
        await self._install(key_pem, response.certificate_pem.encode())
        self.renewals += 1
        log.info("certificate renewed: valid until %s", self._not_after())

    def _not_after(self) -> str:
        return self.current.not_after.isoformat() if self.current is not None else "?"

    async def _install(self, key_pem: bytes, cert_pem: bytes) -> None:
        """Checks the issued certificate against our key and node, then renames the new key and
        certificate over the old ones (the lock keeps a reader from pairing old with new)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        s = self._settings
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CertificateProblem("the control plane answered with no certificate") from None
        key = serialization.load_pem_private_key(key_pem, password=None)
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise CertificateProblem("the issued certificate is not for the key we generated")
        async with self.files_lock:
            key_tmp = await asyncio.to_thread(_write_atomically, s.key, key_pem, 0o600)
            cert_tmp = await asyncio.to_thread(_write_atomically, s.cert, cert_pem, 0o644)
            await asyncio.to_thread(os.replace, key_tmp, s.key)
            await asyncio.to_thread(os.replace, cert_tmp, s.cert)
        self.current = await asyncio.to_thread(read_certificate, s.cert)


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _retry_after(exc: Exception) -> float | None:
    """The delay a RESOURCE_EXHAUSTED answer asks for (trailing metadata retry-after-ms)."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None
