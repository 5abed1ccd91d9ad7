"""Sentinel's development PKI: a CA, a server certificate and SPIFFE-shaped client identities."""

from certs._identity import ROLES, Identity, IdentityError, parse_spiffe_id
from certs._pki import (
    CertificateAuthority,
    IssuedCertificate,
    certificate_serial_hex,
    write_private_key,
)

__all__ = [
    "ROLES",
    "CertificateAuthority",
    "Identity",
    "IdentityError",
    "IssuedCertificate",
    "certificate_serial_hex",
    "parse_spiffe_id",
    "write_private_key",
]
