"""Issues the CA, server and client certificates of a development PKI with `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs._csr import load_csr
from certs._identity import Identity

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class SignedCertificate:
    """A certificate signed from a CSR (its key stays with the requester)."""

    certificate_pem: bytes
    serial_hex: str
    """Lower-case hex, as `certificate_serial_hex` gives it."""
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM."""

    certificate_pem: bytes
    private_key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)


def _new_key() -> PrivateKey:
    # P-256: fast to generate and to handshake with, and accepted by every TLS stack we meet.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_serial_hex(certificate_pem: bytes) -> str:
    """The certificate's serial number as lower-case hex, the form revocation lists use."""
    return format(x509.load_pem_x509_certificate(certificate_pem).serial_number, "x")


def write_private_key(path: pathlib.Path, pem: bytes) -> None:
    """Writes a private key readable by its owner only; it is never world- or group-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
    finally:
        os.close(fd)


class CertificateAuthority:
    """A self-signed CA that signs server and client certificates."""

    def __init__(self, certificate: x509.Certificate, key: PrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    @classmethod
    def create(
        cls, common_name: str = "Sentinel development CA", *, valid_days: int = 3650
    ) -> CertificateAuthority:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: pathlib.Path, key_path: pathlib.Path) -> CertificateAuthority:
        """The CA whose key is at `key_path`; `cert_path` may be a bundle (during a CA rotation
        it holds the old and the new CA), and the certificate matching the key is used."""
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an EC private key")
        wanted = _spki(key.public_key())
        for cert in certs:
            if _spki(cert.public_key()) == wanted:
                return cls(cert, key)
        raise ValueError(f"{key_path}: no certificate in {cert_path} belongs to this key")

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return _key_pem(self._key)

    def _leaf(
        self,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> bytes:
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(
        self,
        hosts: list[str] | None = None,
        *,
        valid_days: int = 365,
    ) -> IssuedCertificate:
        """A serving certificate for `hosts` (DNS names or IP addresses); loopback by default."""
        hosts = hosts or ["localhost", "127.0.0.1", "::1"]
        san: list[x509.GeneralName] = []
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        pem = self._leaf(
            key.public_key(),
            hosts[0],
            san,
            ExtendedKeyUsageOID.SERVER_AUTH,
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=valid_days),
        )
        return IssuedCertificate(pem, _key_pem(key))

    def issue_client(
        self,
        identity: Identity,
        *,
        valid_for: dt.timedelta = dt.timedelta(days=365),
        not_before: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A client certificate whose URI SAN is the identity's SPIFFE id."""
        key = _new_key()
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        pem = self._leaf(
            key.public_key(),
            f"{identity.role}/{identity.name}",
            [x509.UniformResourceIdentifier(identity.spiffe_id)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            start,
            start + valid_for,
        )
        return IssuedCertificate(pem, _key_pem(key))

    def sign_csr(
        self, csr_pem: bytes, identity: Identity, *, valid_for: dt.timedelta
    ) -> SignedCertificate:
        """A client certificate for `identity` over the CSR's public key, valid from now.

        Who the certificate is for comes from `identity` alone; the CSR may only repeat it.
        Raises CsrError (malformed, bad signature, weak key) or CsrIdentityMismatch.
        """
        csr = load_csr(csr_pem, identity)
        # Not backdated: the only verifier of agent certificates is the control plane that
        # issues them, on the same clock; second precision, as X.509 stores it.
        start = dt.datetime.now(dt.UTC).replace(microsecond=0)
        end = start + valid_for
        pem = self._leaf(
            csr.public_key(),
            f"{identity.role}/{identity.name}",
            [x509.UniformResourceIdentifier(identity.spiffe_id)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            start,
            end,
        )
        return SignedCertificate(pem, certificate_serial_hex(pem), start, end)
