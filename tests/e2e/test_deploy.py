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
    assert {"postgres-data", "loki-data", "cluster-keys"} <= set(compose["volumes"])


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
