"""`sentinel-controlplane`: runs the control plane until SIGINT/SIGTERM.

Every flag has an environment variable (SENTINEL_<FLAG>, e.g. SENTINEL_DATABASE_URL); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import pathlib
import signal
import sys

from controlplane._fds import OpenFilesLimit, raise_open_files_limit
from controlplane.app import ControlPlane
from controlplane.settings import ControlPlaneSettings, TlsFiles
from controlplane.store import StoreError
from processkit import configure_logging, field_docs

log = logging.getLogger("controlplane")

_DEFAULTS = ControlPlaneSettings(tls=TlsFiles(pathlib.Path(), pathlib.Path(), pathlib.Path()))


def _env(name: str, default: object) -> str | None:
    value = os.environ.get(f"SENTINEL_{name.upper()}")
    return value if value is not None else (None if default is None else str(default))


def parse_args(argv: list[str] | None) -> tuple[ControlPlaneSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="sentinel-controlplane", description=__doc__)
    certs_dir = _env("certs_dir", ".dev/certs")
    parser.add_argument(
        "--certs-dir", default=certs_dir, help="directory of ca.pem, server.pem, server.key"
    )
    parser.add_argument("--ca", default=_env("ca", None))
    parser.add_argument("--cert", default=_env("cert", None))
    parser.add_argument("--key", default=_env("key", None))
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=_env("log_format", "text")
    )
    parser.add_argument("--log-level", default=_env("log_level", "INFO"))
    docs = field_docs(ControlPlaneSettings)
    for field in dataclasses.fields(ControlPlaneSettings):
        if field.name in ("tls", "extra_grpc_options"):
            continue
        default = getattr(_DEFAULTS, field.name)
        kind = type(default)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=kind(_env(field.name, default) or ""),
            help=docs.get(field.name),
        )
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.certs_dir)
    tls = TlsFiles(
        ca=pathlib.Path(args.ca or directory / "ca.pem"),
        cert=pathlib.Path(args.cert or directory / "server.pem"),
        key=pathlib.Path(args.key or directory / "server.key"),
    )
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ControlPlaneSettings)
        if f.name not in ("tls", "extra_grpc_options")
    }
    return ControlPlaneSettings(tls=tls, **values), args


async def serve(settings: ControlPlaneSettings, open_files: OpenFilesLimit | None = None) -> None:
    control_plane = ControlPlane(settings, open_files=open_files)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await control_plane.start()
    print(f"sentinel-controlplane listening on port {control_plane.port}", flush=True)
    await stop.wait()
    log.info("shutting down")
    await control_plane.stop()


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for path in (settings.tls.ca, settings.tls.cert, settings.tls.key):
        if not path.exists():
            log.error(
                "TLS file %s does not exist; create a dev PKI with `sentinel-certs init %s`",
                path,
                path.parent,
            )
            return 2
    # Each agent session holds a descriptor: take all the hard limit allows, before anything
    # opens one (start-up logs what that leaves room for).
    open_files = raise_open_files_limit()
    try:
        asyncio.run(serve(settings, open_files))
    except (StoreError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
