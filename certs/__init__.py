"""Sentinel's development PKI: a CA, a server certificate and SPIFFE-shaped client identities."""

from certs._csr import CsrError, CsrIdentityMismatch, make_key_and_csr
from certs._identity import ROLES, Identity, IdentityError, parse_spiffe_id, validate_name
from certs._pki import (
    CertificateAuthority,
    IssuedCertificate,
    SignedCertificate,
    certificate_serial_hex,
    write_private_key,
)

__all__ = [
    "ROLES",
    "CertificateAuthority",
    "CsrError",
    "CsrIdentityMismatch",
    "Identity",
    "IdentityError",
    "IssuedCertificate",
    "SignedCertificate",
    "certificate_serial_hex",
    "make_key_and_csr",
    "parse_spiffe_id",
    "validate_name",
    "write_private_key",
]
