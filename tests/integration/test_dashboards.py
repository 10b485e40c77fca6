"""An honest test of the Grafana dashboards: a real Prometheus scrapes a live cluster with the
project's prometheus.yml (adapted to loopback), and every PromQL expression in the dashboards
must return data.  A panel that queries a metric nobody exports fails here."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from haifctl import wire
from tests.cluster import Cluster
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_target(cluster: Cluster, name: str) -> str:
    endpoints = cluster.procs[name].wait_ready()["endpoints"]
    assert isinstance(endpoints, dict)
    return str(endpoints["metrics"]).removeprefix("http://").removesuffix("/metrics")


def loopback_config(cluster: Cluster) -> dict[str, Any]:
    """The project's prometheus.yml with its targets pointed at this cluster's ports."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        if "static_configs" in job:
            for group in job["static_configs"]:
                group["targets"] = [metrics_target(cluster, group["labels"]["daemon"])]
        if "dns_sd_configs" in job:
            del job["dns_sd_configs"]
            workers = [n for n in cluster.procs if n.startswith("worker")]
            job["static_configs"] = [{"targets": [metrics_target(cluster, n) for n in workers]}]
    return config


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Cluster]]:
    binary = require("prometheus", "prometheus")
    workdir = tmp_path_factory.mktemp("dashboards")
    cluster = Cluster(workdir, workers=2, bridge_env={})
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(loopback_config(cluster)))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:  # readiness probe
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < end, "Prometheus never became ready"
            time.sleep(0.1)
        yield url, cluster
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        cluster.stop()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def dashboard_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((board["title"], panel["title"], target["expr"]))
    return out


def test_both_dashboards_are_provisioned() -> None:
    titles = {
        json.loads(p.read_text())["title"]
        for p in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")
    }
    assert titles == {"Service Overview", "Worker Inference"}
    assert len(dashboard_exprs()) >= 16


def test_every_dashboard_query_returns_data(prometheus: tuple[str, Cluster]) -> None:
    url, cluster = prometheus
    with cluster.client() as client:
        for i in range(12):
            msgs = list(client.stream({"prompt": "Once upon a time", "max_tokens": 16, "seed": i}))
            assert isinstance(msgs[-1], wire.Done)
        refused = list(client.stream({"prompt": "x", "max_tokens": "lots"}))
        assert isinstance(refused[-1], wire.Error)
        too_long = list(client.stream({"prompt": "once " * 1500, "max_tokens": 4}))
        assert isinstance(too_long[-1], wire.Error)  # fails on the worker: a worker failure
    # Wait (probing Prometheus) until two scrapes have seen the traffic, so rates have data.
    end = time.monotonic() + 60
    probe = "min(count_over_time(haif_generated_tokens_total[1m]))"
    while True:
        result = query(url, probe)
        if result and float(result[0]["value"][1]) >= 3:
            break
        assert time.monotonic() < end, "Prometheus did not scrape the cluster"
        time.sleep(0.2)
    targets = query(url, "up")
    assert len(targets) == 6  # registry, orchestrator, gateway, bridge and two workers
    assert all(t["value"][1] == "1" for t in targets), targets
    empty = [
        (board, panel, expr) for board, panel, expr in dashboard_exprs() if not query(url, expr)
    ]
    assert empty == [], "panels whose query returned no data:\n" + "\n".join(map(str, empty))
