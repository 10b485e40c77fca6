"""The docker compose stack and its configuration files, checked by the real tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
HAIFCTL_SERVICES = ("registry", "orchestrator", "gateway", "bridge", "worker")


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    return [require("docker-compose")]


def test_compose_file_validates(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text())
    proc = subprocess.run(
        [
            *compose_command(),
            "--env-file",
            str(env),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_stack_shape() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    expected = {
        *HAIFCTL_SERVICES,
        "postgres",
        "prometheus",
        "grafana",
        "loki",
        "promtail",
        "otel-collector",
        "jaeger",
        "plantuml",
        "redis",
    }
    assert expected <= set(services)
    one_shot = {"keys"}  # makes the cluster's CURVE keys, then exits
    for name, service in services.items():
        if name not in one_shot:
            assert service.get("restart") == "unless-stopped", name
            assert "healthcheck" in service, name  # every service, the OTel collector included
    keys = services["keys"]
    assert keys["command"] == ["daemon", "keys"]
    assert keys["restart"] == "no"
    for name in ("keys", *HAIFCTL_SERVICES):  # every ZeroMQ peer reads the same keys
        assert services[name]["environment"]["HAIF_KEYS"] == "/run/haifctl-keys", name
        assert "cluster-keys:/run/haifctl-keys" in services[name]["volumes"], name
    assert services["registry"]["depends_on"]["keys"] == {
        "condition": "service_completed_successfully"
    }
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "tcp://orchestrator:" in " ".join(worker["command"])  # found by service name
    assert services["bridge"]["ports"] == ["8080:8080"]
    assert services["grafana"]["ports"] == ["3001:3000"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["loki"]["ports"] == ["3100:3100"]
    assert services["jaeger"]["ports"] == ["16686:16686"]
    assert services["plantuml"]["ports"] == ["8085:8080"]
    # the worker's health check is its /readyz, on the metrics port
    assert "http://127.0.0.1:9464/readyz" in " ".join(worker["healthcheck"]["test"])
    assert {"postgres-data", "loki-data", "cluster-keys"} <= set(compose["volumes"])
    # the gateways (scalable) share their limits through Redis and report usage to the registry
    gateway = services["gateway"]
    assert gateway["environment"]["HAIF_REDIS_URL"] == "redis://redis:6379/0"
    assert "tcp://registry:5551" in gateway["command"]
    assert "container_name" not in gateway
    assert "ports" not in gateway
    assert "ports" not in services["redis"]  # no password: never published on the host


def test_env_example_names_every_variable() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    defined = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used - defined == set()


def test_prometheus_config_is_valid() -> None:
    promtool = require("promtool")
    proc = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plantuml_server_health_check_renders_a_real_diagram(tmp_path: Path) -> None:
    """The health check asks the server for a diagram: its URL must carry one, in the
    server's encoding, on the port the server listens on inside its container."""
    plantuml = require("plantuml")
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["plantuml"]
    assert service["image"].startswith("plantuml/plantuml-server:")
    test = service["healthcheck"]["test"]
    container_port = service["ports"][0].split(":")[1]
    match = re.fullmatch(rf"http://127\.0\.0\.1:{container_port}/svg/(\S+)", test[-1])
    assert match, test
    assert test[:2] == ["CMD", "curl"]
    assert "-f" in test[2]  # an error answer fails the check
    source = subprocess.run(
        [plantuml, "-decodeurl", match.group(1)], capture_output=True, text=True, timeout=60
    ).stdout
    assert "Bob -> Alice : hello" in source
    (tmp_path / "hello.puml").write_text(source)
    proc = subprocess.run(
        [plantuml, "-tsvg", "-failfast2", str(tmp_path / "hello.puml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "<svg" in (tmp_path / "hello.svg").read_text()


def test_diagram_links_carry_each_diagram_to_the_plantuml_server() -> None:
    """`make diagram-links` (docs/architecture.md): one link per diagram on the compose
    server's port, each decoding back to that diagram's source."""
    plantuml = require("plantuml")
    proc = subprocess.run(
        ["make", "-s", "diagram-links"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    links = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs/architecture").glob("*.puml"))
    assert sorted(links) == sources
    for source, link in links.items():
        prefix = "http://localhost:8085/svg/"
        assert link.startswith(prefix), link
        decoded = subprocess.run(
            [plantuml, "-decodeurl", link.removeprefix(prefix)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert body(decoded) == body((ROOT / source).read_text()), source


def body(diagram: str) -> list[str]:
    """A diagram's statements: what the URL encoding keeps (not its name or comments)."""
    return [
        line
        for line in diagram.splitlines()
        if line.strip() and not line.startswith(("'", "@startuml", "@enduml"))
    ]


def test_readme_service_table_lists_every_published_port() -> None:
    """Each compose service reachable from the host has a row in the README's service table
    with that port."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ")]
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host_port = str(mapping).split(":")[0]
            assert any(
                row.split("|")[1].strip().split(" ")[0].rstrip(",") == name
                and host_port in row.split("|")[2]
                for row in rows
            ), f"README's service table has no row for {name} on {host_port}"
