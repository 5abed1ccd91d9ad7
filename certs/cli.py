"""`sentinel-certs`: creates and extends a development PKI in a directory.

Layout of DIR: `ca.pem`/`ca.key`, `server.pem`/`server.key`, and `<role>-<name>.pem`/`.key` per
client identity. Keys are written 0600. Re-running `init` keeps an existing CA and certificates
and only adds what is missing, so it is safe in a setup script.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from certs._identity import DEFAULT_TRUST_DOMAIN, ROLES, Identity, IdentityError, validate_name
from certs._pki import CertificateAuthority, IssuedCertificate, write_private_key


def _write_pair(directory: pathlib.Path, stem: str, issued: IssuedCertificate) -> None:
    write_private_key(directory / f"{stem}.key", issued.private_key_pem)
    (directory / f"{stem}.pem").write_bytes(issued.certificate_pem)


def _load_or_create_ca(directory: pathlib.Path) -> CertificateAuthority:
    cert, key = directory / "ca.pem", directory / "ca.key"
    if cert.exists() and key.exists():
        return CertificateAuthority.load(cert, key)
    if cert.exists() or key.exists():
        raise SystemExit(f"{directory}: only one of ca.pem and ca.key exists; remove it or both")
    ca = CertificateAuthority.create()
    directory.mkdir(parents=True, exist_ok=True)
    write_private_key(key, ca.private_key_pem)
    cert.write_bytes(ca.certificate_pem)
    print(f"created CA {cert}")
    return ca


def _ensure_client(
    directory: pathlib.Path, ca: CertificateAuthority, identity: Identity, force: bool
) -> None:
    stem = f"{identity.role}-{identity.name}"
    if (directory / f"{stem}.pem").exists() and not force:
        return
    _write_pair(directory, stem, ca.issue_client(identity))
    print(f"issued {identity.spiffe_id} -> {directory / stem}.pem")


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        validate_name(name)
    return names


def _cmd_init(args: argparse.Namespace) -> None:
    directory: pathlib.Path = args.dir
    ca = _load_or_create_ca(directory)
    if not (directory / "server.pem").exists() or args.force:
        _write_pair(directory, "server", ca.issue_server(args.server_host or None))
        print(f"issued server certificate -> {directory / 'server.pem'}")
    wanted = {
        "agent": args.agents,
        "planner": args.planners,
        "operator": args.operators,
        "viewer": args.viewers,
    }
    for role, names in wanted.items():
        for name in _names(names):
            _ensure_client(directory, ca, Identity(args.trust_domain, role, name), args.force)


def _cmd_issue(args: argparse.Namespace) -> None:
    directory: pathlib.Path = args.dir
    if not (directory / "ca.pem").exists():
        raise SystemExit(f"{directory}: no CA here; run `sentinel-certs init {directory}` first")
    ca = _load_or_create_ca(directory)
    identity = Identity(args.trust_domain, args.role, validate_name(args.name))
    _ensure_client(directory, ca, identity, force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sentinel-certs", description=__doc__)
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create (or complete) a development PKI in DIR")
    init.add_argument("dir", type=pathlib.Path)
    init.add_argument("--agents", default="node-1,node-2", help="comma-separated node ids")
    init.add_argument("--planners", default="inframind")
    init.add_argument("--operators", default="admin")
    init.add_argument("--viewers", default="readonly")
    init.add_argument(
        "--server-host",
        action="append",
        help="DNS name or IP for the server certificate (repeatable; default loopback)",
    )
    init.add_argument("--force", action="store_true", help="re-issue existing certificates")
    init.set_defaults(func=_cmd_init)
    issue = sub.add_parser("issue", help="issue one more client certificate from DIR's CA")
    issue.add_argument("dir", type=pathlib.Path)
    issue.add_argument("--role", choices=ROLES, required=True)
    issue.add_argument("--name", required=True)
    issue.set_defaults(func=_cmd_issue)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except IdentityError as exc:
        print(f"sentinel-certs: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
