"""sentinel-certs: a usable development PKI, private keys owner-only, safe to re-run."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from certs import IdentityError, parse_spiffe_id
from certs.cli import main


def test_init_makes_ca_server_and_spiffe_identities_with_private_keys(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert main(["init", str(directory), "--agents", "gpu-a,gpu-b", "--operators", "ops"]) == 0
    for stem in (
        "ca",
        "server",
        "agent-gpu-a",
        "agent-gpu-b",
        "operator-ops",
        "planner-inframind",
        "viewer-readonly",
    ):
        key = directory / f"{stem}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, stem
        assert (directory / f"{stem}.pem").exists()
    cert = x509.load_pem_x509_certificate((directory / "agent-gpu-a.pem").read_bytes())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://sentinel.local/agent/gpu-a"
    ]
    server = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)


def test_init_again_keeps_existing_ca_and_certificates(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    main(["init", str(directory)])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    main(["init", str(directory), "--agents", "node-1,node-2,node-3"])
    after = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"agent-node-3.pem", "agent-node-3.key"}


def test_bad_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "pki"), "--agents", "bad/name"]) == 2
    assert "invalid name" in capsys.readouterr().err


@pytest.mark.parametrize(
    "uri",
    [
        "https://sentinel.local/agent/a",
        "spiffe://sentinel.local/agent",
        "spiffe://sentinel.local/root/a",
        "spiffe://sentinel.local/agent/a/b",
        "spiffe://other.domain/agent/a",
    ],
)
def test_spiffe_ids_are_parsed_strictly(uri: str) -> None:
    with pytest.raises(IdentityError):
        parse_spiffe_id(uri, "sentinel.local")
