"""Fixtures: a running test API server with three schedulable nodes, a kubeconfig pointing at
it, and the official Kubernetes client's APIs."""

from __future__ import annotations

import json
import pathlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config, dynamic, watch

from tests.kubeapi import KubeApiServer, write_kubeconfig

NAMESPACE = "ml"


@pytest.fixture
def kube(request: pytest.FixtureRequest) -> Iterator[KubeApiServer]:
    """A server whose controller ticks every 50 ms; parametrized indirectly with "manual", the
    controller steps only when the test calls `cluster.tick()`."""
    manual = getattr(request, "param", None) == "manual"
    with KubeApiServer(tick_seconds=None if manual else 0.05) as server:
        for index in range(3):
            server.cluster.add_node(f"gpu-{index}", labels={"sentinel.dev/pool": "gpu"})
        server.cluster.put(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        yield server


@pytest.fixture
def kubeconfig(kube: KubeApiServer, tmp_path: pathlib.Path) -> pathlib.Path:
    return write_kubeconfig(tmp_path / "kubeconfig", {"test": kube.url})


def new_client(kubeconfig: pathlib.Path, context: str | None = None) -> Any:
    """An ApiClient for one context of a kubeconfig (close it after use)."""
    return config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), context=context
    )


def new_watch() -> Any:
    return watch.Watch()  # type: ignore[no-untyped-call]


@pytest.fixture
def api_client(kubeconfig: pathlib.Path) -> Iterator[Any]:
    api = new_client(kubeconfig, "test")
    yield api
    api.close()


@pytest.fixture
def apps(api_client: Any) -> Any:
    return client.AppsV1Api(api_client)


@pytest.fixture
def core(api_client: Any) -> Any:
    return client.CoreV1Api(api_client)


@pytest.fixture
def policy(api_client: Any) -> Any:
    return client.PolicyV1Api(api_client)


@pytest.fixture
def deployments(api_client: Any) -> Any:
    """Deployments through the dynamic client, which sends bodies without checking them (the
    typed APIs refuse unknown fields before sending)."""
    dynamic_client = dynamic.DynamicClient(api_client)  # type: ignore[no-untyped-call]
    return dynamic_client.resources.get(api_version="apps/v1", kind="Deployment")


def status_of(error: client.ApiException) -> dict[str, Any]:
    """The `Status` body of an API error."""
    body: dict[str, Any] = json.loads(error.body or "{}")
    return body


MANUAL_TICKS = pytest.mark.parametrize("kube", ["manual"], indirect=True)


def raw(
    server: KubeApiServer,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    """One HTTP request outside the client: (status code, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())
