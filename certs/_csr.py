"""Certificate signing requests: the agent's side (a new key and a CSR for its identity) and the
CA's checks before it signs one (well-formed, self-signed, a strong key, no foreign identity)."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certs._identity import Identity

_MIN_RSA_BITS = 2048
_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MAX_CSR_BYTES = 64 * 1024


class CsrError(ValueError):
    """A CSR that cannot be signed: malformed, badly signed, or with a key we do not accept."""


class CsrIdentityMismatch(CsrError):
    """A CSR whose subject or SAN names an identity other than the one being issued."""


def make_key_and_csr(identity: Identity) -> tuple[bytes, bytes]:
    """A new P-256 private key and a CSR for `identity`, both PEM; the key never leaves here."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{identity.role}/{identity.name}")])
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _check_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"unsupported public key: {exc}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            raise CsrError(f"EC curve {key.curve.name} is not accepted; use P-256 or P-384")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits; at least {_MIN_RSA_BITS} required")
        return
    raise CsrError(f"{type(key).__name__} keys are not accepted; use EC P-256/P-384 or RSA")


def _check_names(csr: x509.CertificateSigningRequest, identity: Identity) -> None:
    """The CSR may name nobody, or exactly this identity; it never decides who it is for."""
    accepted_cns = {identity.name, f"{identity.role}/{identity.name}", identity.spiffe_id}
    for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if attribute.value not in accepted_cns:
            raise CsrIdentityMismatch(
                f"subject CN {attribute.value!r} names another identity than {identity.spiffe_id}"
            )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for name in san:
        if not (
            isinstance(name, x509.UniformResourceIdentifier) and name.value == identity.spiffe_id
        ):
            raise CsrIdentityMismatch(
                f"subject alternative name {name.value!r} names another identity than "
                f"{identity.spiffe_id}"
            )


def load_csr(csr_pem: bytes, identity: Identity) -> x509.CertificateSigningRequest:
    """The parsed CSR when it may be signed for `identity`; raises CsrError (or
    CsrIdentityMismatch) saying why not."""
    if len(csr_pem) > _MAX_CSR_BYTES:
        raise CsrError(f"larger than {_MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrError("not a PEM PKCS#10 certificate request") from None
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"signature cannot be checked: {exc}") from None
    if not signature_ok:
        raise CsrError("its signature does not verify with its own public key")
    _check_key(csr)
    try:
        _check_names(csr, identity)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        if isinstance(exc, CsrError):
            raise
        raise CsrError(f"unreadable extensions: {exc}") from None
    return csr
