"""kubectl against the test API server: discovery, `get` with server-side printing, and
`rollout status` following a watch to success or to the progress deadline."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from tests.kubeapi import KubeApiServer, objects
from tests.kubeapi_tests.conftest import NAMESPACE

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

pytestmark = pytest.mark.skipif(
    not pathlib.Path(KUBECTL).exists(), reason="kubectl is not installed on this machine"
)


def _kubectl(kubeconfig: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            KUBECTL,
            "--kubeconfig",
            str(kubeconfig),
            "--cache-dir",
            str(kubeconfig.parent / "kube-cache"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_kubectl_get_prints_deployments(kube: KubeApiServer, kubeconfig: pathlib.Path) -> None:
    kube.cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=3))
    kube.cluster.wait_for(
        lambda: (
            (kube.cluster.require("Deployment", NAMESPACE, "web").get("status") or {}).get(
                "availableReplicas"
            )
            == 3
        )
    )
    result = _kubectl(kubeconfig, "get", "deployments", "-n", NAMESPACE)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert row.split()[:4] == ["web", "3/3", "3", "3"]

    nodes = _kubectl(kubeconfig, "get", "nodes", "-o", "name")
    assert nodes.stdout.split() == ["node/gpu-0", "node/gpu-1", "node/gpu-2"]
    on_node = _kubectl(
        kubeconfig, "get", "pods", "-A", "--field-selector", "spec.nodeName=gpu-1", "-o", "name"
    )
    assert on_node.returncode == 0, on_node.stderr
    pods = kube.cluster.list("Pod", field_selector="spec.nodeName=gpu-1")
    assert on_node.stdout.split() == [f"pod/{p['metadata']['name']}" for p in pods]


def test_kubectl_rollout_status_follows_a_rollout_to_success(
    kube: KubeApiServer, kubeconfig: pathlib.Path
) -> None:
    kube.cluster.put(objects.deployment("web", namespace=NAMESPACE, replicas=3))
    patch = _kubectl(
        kubeconfig,
        "set",
        "image",
        "deployment/web",
        "main=repo/model:2",
        "-n",
        NAMESPACE,
    )
    assert patch.returncode == 0, patch.stderr
    result = _kubectl(
        kubeconfig, "rollout", "status", "deployment/web", "-n", NAMESPACE, "--timeout=20s"
    )
    assert result.returncode == 0, result.stderr
    assert 'deployment "web" successfully rolled out' in result.stdout
    pods = kube.cluster.list("Pod", NAMESPACE, label_selector="app=web")
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {"repo/model:2"}


def test_kubectl_rollout_status_reports_the_progress_deadline(
    kube: KubeApiServer, kubeconfig: pathlib.Path
) -> None:
    kube.cluster.mark_broken_image("repo/model:bad")
    deployment = objects.deployment(
        "web", namespace=NAMESPACE, image="repo/model:bad", progress_deadline_seconds=2
    )
    kube.cluster.put(deployment)
    result = _kubectl(
        kubeconfig, "rollout", "status", "deployment/web", "-n", NAMESPACE, "--timeout=20s"
    )
    assert result.returncode != 0
    assert 'deployment "web" exceeded its progress deadline' in result.stderr
