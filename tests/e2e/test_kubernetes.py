"""The Kubernetes manifests (deploy/kubernetes): every one valid for a pinned Kubernetes API,
the kustomize base and the GPU overlay rendered by the real kustomize where one is installed
(`kustomize`, or `kubectl kustomize`), and the shape a cluster of haifctl daemons needs: probes on
the ports the daemons serve them, addresses that name real Services, the CURVE keys mounted
where HAIF_KEYS says, time to drain, resources, scrape annotations, budgets, autoscaling."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from haifctl.daemon.base import Daemon
from haifctl.security import ROLES, Keyring
from haifctl.telemetry import Metrics
from tests.e2e.conftest import HAIFCTL

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
# The Kubernetes API the manifests are checked against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.31.0"
DAEMONS = ("registry", "orchestrator", "gateway", "bridge", "worker")
NAMESPACE = "haifctl"

Resource = dict[str, Any]


def load(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def validate(resource: Resource) -> None:
    """Strict: an unknown field (a typo, a field of a newer API) fails too."""
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def kustomize() -> list[str] | None:
    """The command that renders a kustomization, if this machine has one."""
    if path := shutil.which("kustomize"):
        return [path, "build"]
    kubectl = shutil.which("kubectl")
    if (
        kubectl
        and subprocess.run([kubectl, "kustomize", "--help"], capture_output=True).returncode == 0
    ):
        return [kubectl, "kustomize"]
    return None


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """deploy/kubernetes as a user has it before the first apply: secrets.env made from the
    example, and the cluster's keys made by `haifctl daemon keys` into base/keys."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets.env", "keys"))
    base = copy / "base"
    shutil.copy(base / "secrets.env.example", base / "secrets.env")
    proc = subprocess.run(
        [HAIFCTL, "daemon", "keys"],
        env={**os.environ, "HAIF_KEYS": str(base / "keys")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(base / "keys")
    return copy


def render(folder: Path) -> list[Resource]:
    command = kustomize()
    if command is None:
        pytest.skip("no kustomize here (`kustomize` or `kubectl kustomize`); the files are checked")
    proc = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def base_resources(tree: Path) -> list[Resource]:
    """The base as kustomize renders it; without kustomize, its files as they are, plus the
    generated Secrets by name (no hash suffix: every reference still matches)."""
    if kustomize() is not None:
        return render(tree / "base")
    kustomization = yaml.safe_load((tree / "base" / "kustomization.yaml").read_text())
    resources = [doc for name in kustomization["resources"] for doc in load(tree / "base" / name)]
    for generator in kustomization["secretGenerator"]:
        data: dict[str, str] = {}
        for env in generator.get("envs", []):
            for line in (tree / "base" / env).read_text().splitlines():
                if line and not line.startswith("#"):
                    key, value = line.split("=", 1)
                    data[key] = base64.b64encode(value.encode()).decode()
        for file in generator.get("files", []):
            data[Path(file).name] = base64.b64encode((tree / "base" / file).read_bytes()).decode()
        resources.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return resources


def by_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    """Resources of one kind by name, a generated name's hash suffix taken off."""
    out = {}
    for r in resources:
        if r["kind"] == kind:
            out[re.sub(r"-[a-z0-9]{10}$", "", r["metadata"]["name"])] = r
    return out


def container(deployment: Resource) -> Resource:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Resource = containers[0]
    return result


def port_named(c: Resource, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"{c['name']} has no port named {name}"
    return int(ports[name])


# --- the files ---------------------------------------------------------------------------------


def test_every_manifest_in_the_base_validates() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk  # nothing forgotten, nothing listed that is not there
    kinds = set()
    for name in sorted(listed):
        for resource in load(K8S / "base" / name):
            validate(resource)
            kinds.add(resource["kind"])
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    } <= kinds


def test_a_broken_manifest_is_caught() -> None:
    """The validator really checks: a misspelt field and a wrong type both fail."""
    deployment = load(K8S / "base" / "worker.yaml")[0]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = load(K8S / "base" / "worker.yaml")[0]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_the_kustomizations_list_what_exists(tree: Path) -> None:
    """What `kubectl apply -k` reads: every listed file, every generator's source (once the
    user made them), and each overlay patch aims at a resource of the base."""
    base = yaml.safe_load((tree / "base" / "kustomization.yaml").read_text())
    assert base["namespace"] == NAMESPACE
    for name in base["resources"]:
        assert (tree / "base" / name).is_file(), name
    sources = [
        s
        for generator in base["secretGenerator"]
        for s in (*generator.get("envs", []), *generator.get("files", []))
    ]
    assert sources == ["secrets.env", "keys/cluster.json"]
    for source in sources:
        assert (tree / "base" / source).is_file(), source
    defined = {
        (r["kind"], r["metadata"]["name"])
        for n in base["resources"]
        for r in load(tree / "base" / n)
    }
    overlay = yaml.safe_load((tree / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    assert overlay["patches"]
    for patch in overlay["patches"]:
        for resource in load(tree / "overlays" / "gpu" / patch["path"]):
            assert (resource["kind"], resource["metadata"]["name"]) in defined, patch


def test_secrets_stay_out_of_git_and_the_example_names_every_key() -> None:
    for path in ("deploy/kubernetes/base/secrets.env", "deploy/kubernetes/base/keys/cluster.json"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert proc.returncode == 0, f"{path} is not ignored by git"
    example = (K8S / "base" / "secrets.env.example").read_text()
    given = {line.split("=", 1)[0] for line in example.splitlines() if line and line[0] != "#"}
    wanted = set(
        re.findall(
            r"secretKeyRef: \{name: haifctl-secrets, key: (\w+)\}",
            "".join(p.read_text() for p in (K8S / "base").glob("*.yaml")),
        )
    )
    assert wanted == {"POSTGRES_USER", "POSTGRES_PASSWORD", "HAIF_API_KEYS"}
    assert wanted <= given


# --- rendered ----------------------------------------------------------------------------------


def test_the_base_renders_and_every_resource_validates(tree: Path) -> None:
    resources = render(tree / "base")
    for resource in resources:
        validate(resource)
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == NAMESPACE, resource["metadata"]
    assert set(by_kind(resources, "Deployment")) == set(DAEMONS)
    secrets = by_kind(resources, "Secret")
    assert set(secrets) == {"haifctl-secrets", "haifctl-cluster-keys"}
    # a generated name carries its content's hash, and every reference was renamed with it
    keys_name = secrets["haifctl-cluster-keys"]["metadata"]["name"]
    assert keys_name != "haifctl-cluster-keys"
    for deployment in by_kind(resources, "Deployment").values():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cluster-keys"]["secret"]["secretName"] == keys_name


def test_the_keys_secret_holds_the_clusters_keys(tree: Path, tmp_path: Path) -> None:
    """What the daemons read from HAIF_KEYS: the keys `haifctl daemon keys` made, whole."""
    secret = by_kind(base_resources(tree), "Secret")["haifctl-cluster-keys"]
    assert set(secret["data"]) == {"cluster.json"}
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (mounted / "cluster.json").write_bytes(base64.b64decode(secret["data"]["cluster.json"]))
    keyring = Keyring.load(mounted)
    made = Keyring.load(tree / "base" / "keys")
    assert keyring.server_secret == made.server_secret is not None
    assert set(keyring.pairs) == set(ROLES)


def test_the_gpu_overlay_gives_each_worker_a_gpu(tree: Path) -> None:
    base = render(tree / "base")
    gpu = render(tree / "overlays" / "gpu")
    for resource in gpu:
        validate(resource)
    worker = by_kind(gpu, "Deployment")["worker"]
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HAIF_N_GPU_LAYERS"] == "-1"
    assert {"POD_NAME", "HAIF_THREADS"} <= set(env)  # merged with the base's, not replaced
    tolerations = worker["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # the probes and everything else of the base worker are still there
    base_worker = container(by_kind(base, "Deployment")["worker"])
    for key in ("livenessProbe", "readinessProbe", "startupProbe", "args", "volumeMounts"):
        assert c[key] == base_worker[key], key
    # nothing but the workers and their autoscaler differs
    changed = {(r["kind"], r["metadata"]["name"]) for r in gpu if r not in base}
    assert changed == {("Deployment", "worker"), ("HorizontalPodAutoscaler", "worker")}


# --- the shape of a haifctl cluster --------------------------------------------------------------


@pytest.fixture
def resources(tree: Path) -> list[Resource]:
    return base_resources(tree)


def config(resources: list[Resource]) -> dict[str, str]:
    data: dict[str, str] = by_kind(resources, "ConfigMap")["haifctl-config"]["data"]
    return data


def test_every_daemon_is_probed_where_it_serves_its_probes(resources: list[Resource]) -> None:
    metrics_port = int(config(resources)["OTEL_PROMETHEUS_PORT"])
    assert config(resources)["HAIF_METRICS_HOST"] == "0.0.0.0"  # reachable by the kubelet
    for name, deployment in by_kind(resources, "Deployment").items():
        c = container(deployment)
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        if name == "bridge":  # its own HTTP port, where --bind puts it
            port = port_named(c, c["readinessProbe"]["httpGet"]["port"])
            assert c["args"][c["args"].index("--bind") + 1] == f"0.0.0.0:{port}"
        else:  # the metrics port, which serves /healthz and /readyz too
            assert port_named(c, c["readinessProbe"]["httpGet"]["port"]) == metrics_port, name
        assert c["livenessProbe"]["httpGet"]["port"] == c["readinessProbe"]["httpGet"]["port"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == "/metrics", name
        assert int(annotations["prometheus.io/port"]) == port_named(c, "metrics") == metrics_port


def test_every_daemon_has_requests_time_to_drain_and_the_keys(resources: list[Resource]) -> None:
    settings = config(resources)
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"--uid (\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    for name, deployment in by_kind(resources, "Deployment").items():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        c = container(deployment)
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
        assert "memory" in c["resources"]["limits"], name
        # SIGTERM drains for up to drain_grace_s; the bridge first waits out its preStop
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
        assert pod["terminationGracePeriodSeconds"] >= Daemon.drain_grace_s + pause + 5, name
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["securityContext"]["fsGroup"] == uid  # the keys are group-readable to it
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["envFrom"] == [{"configMapRef": {"name": config_name(resources)}}], name
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["cluster-keys"]["mountPath"] == settings["HAIF_KEYS"], name
        assert mounts["cluster-keys"]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["cluster-keys"]["secret"]["defaultMode"] == 0o440
        assert mounts["home"]["mountPath"] == "/home/haif/.haifctl"  # the image's HAIF_HOME
        assert "ENV HAIF_HOME=/home/haif/.haifctl" in dockerfile


def config_name(resources: list[Resource]) -> str:
    name: str = by_kind(resources, "ConfigMap")["haifctl-config"]["metadata"]["name"]
    return name


def test_every_address_names_a_service_of_the_daemon_listening_there(
    resources: list[Resource],
) -> None:
    deployments = by_kind(resources, "Deployment")
    services = by_kind(resources, "Service")
    assert set(services) == {"registry", "orchestrator", "gateway", "bridge"}
    dialled = set()
    for deployment in deployments.values():
        for host, port in re.findall(
            r"tcp://([a-z0-9.-]+):(\d+)", " ".join(container(deployment)["args"])
        ):
            if host == "0.0.0.0":
                continue
            dialled.add(host)
            service = services[host]
            target = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
            selected = [
                d
                for d in deployments.values()
                if service["spec"]["selector"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(selected) == 1, host
            listener = container(selected[0])
            assert port_named(listener, target["targetPort"]) == int(port)
            assert f"tcp://0.0.0.0:{port}" in listener["args"]  # it binds there
    assert dialled == {"registry", "orchestrator", "gateway"}


def test_budgets_autoscaling_and_one_orchestrator(resources: list[Resource]) -> None:
    deployments = by_kind(resources, "Deployment")
    orchestrator = deployments["orchestrator"]["spec"]
    assert orchestrator["replicas"] == 1
    assert orchestrator["strategy"] == {"type": "Recreate"}  # never two at once
    budgets = by_kind(resources, "PodDisruptionBudget")
    assert set(budgets) == {"worker", "gateway", "bridge"}
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert deployments[name]["spec"]["replicas"] > budget["spec"]["maxUnavailable"]
    hpa = by_kind(resources, "HorizontalPodAutoscaler")["worker"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "worker",
    }
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in container(deployments["worker"])["resources"]["requests"]  # what % is of
    assert hpa["minReplicas"] <= deployments["worker"]["spec"]["replicas"] <= hpa["maxReplicas"]


def test_the_documented_queue_depth_autoscaler_validates(resources: list[Resource]) -> None:
    """docs/operations.md's HPA on haif_queue_depth: valid, and aimed at the worker Deployment."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### Autoscaling on queue depth", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    hpa = yaml.safe_load(block)
    validate(hpa)
    assert hpa["metadata"]["namespace"] == NAMESPACE
    assert (
        hpa["spec"]["scaleTargetRef"]
        == by_kind(resources, "HorizontalPodAutoscaler")["worker"]["spec"]["scaleTargetRef"]
    )
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "haif_queue_depth"
    # the metric it names is one the daemons export
    exported = generate_latest(Metrics("orchestrator").registry).decode()
    assert "# TYPE haif_queue_depth gauge" in exported


def test_operations_docs_say_how_to_apply() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "kubectl apply -k deploy/kubernetes/base" in text
    assert "kubectl apply -k deploy/kubernetes/overlays/gpu" in text
    assert "HAIF_KEYS=deploy/kubernetes/base/keys haifctl daemon keys" in text
