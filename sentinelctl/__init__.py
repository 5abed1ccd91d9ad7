"""`sentinelctl`: the operator's command line for a running control plane. A client of the
public API only: it imports nothing of the server."""

from sentinelctl.cli import main

__all__ = ["main"]
