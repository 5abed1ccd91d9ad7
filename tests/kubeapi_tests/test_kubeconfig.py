"""Kubeconfig files naming several test servers, read by the official client and kubectl."""

from __future__ import annotations

import pathlib

import yaml
from kubernetes import client

from tests.kubeapi import KubeApiServer, objects, write_kubeconfig
from tests.kubeapi_tests.conftest import new_client


def test_one_context_per_server_reaches_each_cluster(tmp_path: pathlib.Path) -> None:
    with KubeApiServer(tick_seconds=None) as east, KubeApiServer(tick_seconds=None) as west:
        east.cluster.put(objects.deployment("east-app"))
        west.cluster.put(objects.deployment("west-app"))
        path = write_kubeconfig(tmp_path / "config", {"east": east.url, "west": west.url}, "west")
        document = yaml.safe_load(path.read_text())
        assert document["current-context"] == "west"
        assert [c["cluster"]["server"] for c in document["clusters"]] == [east.url, west.url]
        assert all(u["user"]["token"] for u in document["users"])

        for context, expected in (("east", "east-app"), (None, "west-app")):
            api = new_client(path, context)
            try:
                names = [
                    d.metadata.name
                    for d in client.AppsV1Api(api).list_namespaced_deployment("default").items
                ]
            finally:
                api.close()
            assert names == [expected]
        assert east.cluster.requests[-1].path == "/apis/apps/v1/namespaces/default/deployments"


def test_default_namespace_can_be_written(tmp_path: pathlib.Path) -> None:
    path = write_kubeconfig(tmp_path / "config", {"a": "http://127.0.0.1:1"}, namespace="ml")
    contexts = yaml.safe_load(path.read_text())["contexts"]
    assert contexts == [{"name": "a", "context": {"cluster": "a", "user": "a", "namespace": "ml"}}]
