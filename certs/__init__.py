"""Sentinel's PKI: a runtime library for SPIFFE identities, certificates and CSRs, not only the
development-CA tooling behind `sentinel-certs` (`certs.cli`).

The control plane uses it to issue, parse and check SPIFFE identities and certificates, and
enrollment signs node agents' CSRs with it; agents make their key and CSR with it too.
"""

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
