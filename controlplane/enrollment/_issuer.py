"""Issues agent certificates: at enrollment (a bootstrap token vouches for the node) and at
renewal (the agent's current certificate does), and records each one it issues."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
from dataclasses import dataclass

from sqlalchemy import Connection, insert

from certs import (
    CertificateAuthority,
    Identity,
    IdentityError,
    SignedCertificate,
    validate_name,
)
from controlplane.enrollment._bootstrap_tokens import BootstrapTokens
from controlplane.store import ISSUED_CERTIFICATES, Store

log = logging.getLogger(__name__)


class CaUnavailable(Exception):
    """The CA key is not configured or cannot be read: nothing can be signed."""


class NodeIdInvalid(ValueError):
    """The node id of an enrollment is not a valid identity name."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate signed for an agent, with the CA bundle to trust."""

    certificate_pem: bytes
    ca_bundle_pem: bytes
    serial_hex: str
    not_after: dt.datetime
    spiffe_id: str
    token_id: str = ""


def load_ca(ca_bundle: pathlib.Path, ca_key: pathlib.Path) -> CertificateAuthority | str:
    """The signing CA, or why there is none (a message that says what to configure)."""
    if not ca_key.exists():
        return (
            f"the CA key {ca_key} does not exist: set `ca_key` to the CA's private key (PEM) "
            "to enable enrollment and certificate renewal"
        )
    try:
        return CertificateAuthority.load(ca_bundle, ca_key)
    except (OSError, ValueError) as exc:
        return f"the CA key {ca_key} cannot be used with {ca_bundle}: {exc}"


class CertificateIssuer:
    """Signs agents' CSRs at enrollment and renewal, and records what it issued."""

    def __init__(
        self,
        store: Store,
        tokens: BootstrapTokens,
        *,
        ca: CertificateAuthority | str,
        ca_bundle_pem: bytes,
        trust_domain: str,
        lifetime: dt.timedelta,
    ) -> None:
        """`ca` is the signing CA, or the reason there is none."""
        self._store = store
        self._tokens = tokens
        self._ca = ca
        self._ca_bundle_pem = ca_bundle_pem
        self._trust_domain = trust_domain
        self._lifetime = lifetime

    def _signing_ca(self) -> CertificateAuthority:
        if isinstance(self._ca, str):
            raise CaUnavailable(self._ca)
        return self._ca

    def _record(
        self, db: Connection, identity: Identity, signed: SignedCertificate, via: str
    ) -> None:
        db.execute(
            insert(ISSUED_CERTIFICATES).values(
                serial=signed.serial_hex,
                node_id=identity.name,
                spiffe_id=identity.spiffe_id,
                issued_at=signed.not_before,
                not_after=signed.not_after,
                via=via,
            )
        )

    def _issued(self, identity: Identity, signed: SignedCertificate, token_id: str = "") -> Issued:
        return Issued(
            signed.certificate_pem,
            self._ca_bundle_pem,
            signed.serial_hex,
            signed.not_after,
            identity.spiffe_id,
            token_id,
        )

    async def enroll(self, token: str, node_id: str, csr_pem: bytes) -> Issued:
        """A certificate for `node_id` in exchange for one use of `token`.

        Raises NodeIdInvalid, CaUnavailable, TokenRefused, CsrError / CsrIdentityMismatch. The
        token is checked first, and its use is taken, the CSR signed and the certificate
        recorded in one transaction: a refused CSR costs no use, and nothing is issued unless
        the use was taken.
        """
        try:
            validate_name(node_id)
        except IdentityError as exc:
            raise NodeIdInvalid(str(exc)) from None
        ca = self._signing_ca()
        identity = Identity(self._trust_domain, "agent", node_id)

        def work(db: Connection) -> Issued:
            redeemed = self._tokens.redeem(db, token, node_id)
            signed = ca.sign_csr(csr_pem, identity, valid_for=self._lifetime)
            self._record(db, identity, signed, "enroll")
            return self._issued(identity, signed, redeemed.token_id)

        issued = await self._store.run_core(work)
        log.info(
            "enrolled node %s (certificate %s, valid until %s)",
            node_id,
            issued.serial_hex,
            issued.not_after.isoformat(),
        )
        return issued

    async def renew(self, node_id: str, csr_pem: bytes) -> Issued:
        """A fresh certificate for an agent that proved `node_id` with its current one.

        Raises CaUnavailable, CsrError / CsrIdentityMismatch.
        """
        ca = self._signing_ca()
        identity = Identity(self._trust_domain, "agent", node_id)

        def work(db: Connection) -> SignedCertificate:
            # Signed on the store thread, as for enrollment: parsing and signing stay off the
            # event loop, and the certificate exists only if its record was written.
            signed = ca.sign_csr(csr_pem, identity, valid_for=self._lifetime)
            self._record(db, identity, signed, "renew")
            return signed

        signed = await self._store.run_core(work)
        log.info(
            "renewed the certificate of node %s (%s, valid until %s)",
            node_id,
            signed.serial_hex,
            signed.not_after.isoformat(),
        )
        return self._issued(identity, signed)
