"""Identity lifecycle of node agents: bootstrap tokens, enrollment and certificate renewal."""

from controlplane.enrollment._bootstrap_tokens import (
    MAX_TOKEN_TTL,
    MAX_TOKEN_USES,
    BootstrapTokens,
    CreatedToken,
    TokenRefused,
    TokenRequestInvalid,
)
from controlplane.enrollment._issuer import (
    CaUnavailable,
    CertificateIssuer,
    Issued,
    NodeIdInvalid,
    load_ca,
)

__all__ = [
    "MAX_TOKEN_TTL",
    "MAX_TOKEN_USES",
    "BootstrapTokens",
    "CaUnavailable",
    "CertificateIssuer",
    "CreatedToken",
    "Issued",
    "NodeIdInvalid",
    "TokenRefused",
    "TokenRequestInvalid",
    "load_ca",
]
