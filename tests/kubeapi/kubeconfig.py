"""Kubeconfig files for test API servers: one cluster, user and context per server."""

from __future__ import annotations

import pathlib

import yaml

DEFAULT_TOKEN = "sentinel-test-token"


def write_kubeconfig(
    path: str | pathlib.Path,
    contexts: dict[str, str],
    current: str | None = None,
    *,
    token: str = DEFAULT_TOKEN,
    namespace: str | None = None,
) -> pathlib.Path:
    """Writes a kubeconfig with one context per entry of `contexts` (context name -> server URL),
    each with its own cluster and token user; `current` defaults to the first context."""
    if not contexts:
        raise ValueError("a kubeconfig needs at least one context")
    if current is not None and current not in contexts:
        raise ValueError(f"current context {current!r} is not among {sorted(contexts)}")
    context_entries = []
    for name in contexts:
        context: dict[str, str] = {"cluster": name, "user": name}
        if namespace is not None:
            context["namespace"] = namespace
        context_entries.append({"name": name, "context": context})
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": url}} for name, url in contexts.items()],
        "users": [{"name": name, "user": {"token": token}} for name in contexts],
        "contexts": context_entries,
        "current-context": current if current is not None else next(iter(contexts)),
        "preferences": {},
    }
    target = pathlib.Path(path)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target
