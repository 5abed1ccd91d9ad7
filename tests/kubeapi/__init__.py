"""A Kubernetes API test server of our own: real REST paths and JSON over HTTP, validation with
the official schemas, watches, dry runs, eviction against PodDisruptionBudgets, a simulated
controller, and failure injection for the tests of the Kubernetes executor.

    with KubeApiServer() as kube:                      # 127.0.0.1, a free port, ticking
        kube.cluster.add_node("gpu-0")
        kube.cluster.put(objects.deployment("llm", namespace="default", replicas=2))
        write_kubeconfig(path, {"lab": kube.url})      # for kubernetes.config / kubectl
        kube.cluster.forbid("patch", "deployments")   # then: 403 as RBAC words it
"""

from tests.kubeapi._cluster import Cluster, RequestRecord
from tests.kubeapi._controller import POD_TEMPLATE_HASH, REVISION_ANNOTATION, template_hash
from tests.kubeapi.kubeconfig import DEFAULT_TOKEN, write_kubeconfig
from tests.kubeapi.server import KubeApiServer

__all__ = [
    "DEFAULT_TOKEN",
    "POD_TEMPLATE_HASH",
    "REVISION_ANNOTATION",
    "Cluster",
    "KubeApiServer",
    "RequestRecord",
    "template_hash",
    "write_kubeconfig",
]
