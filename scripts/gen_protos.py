"""Regenerates gen/ (Python messages, gRPC stubs and mypy stubs) from protos/.

One command: `python scripts/gen_protos.py`. CI runs it and fails when gen/ changes.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
PACKAGE_DIRS = ("sentinel", "sentinel/v1")


def main() -> int:
    out = GEN / "sentinel"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={GEN}",
        f"--grpc_python_out={GEN}",
        f"--mypy_out={GEN}",
        f"--mypy_grpc_out={GEN}",
        *sources,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for package in PACKAGE_DIRS:
        (GEN / package / "__init__.py").write_text('"""Generated from protos/; do not edit."""\n')
    (GEN / "sentinel" / "v1" / "py.typed").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
