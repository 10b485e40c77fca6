"""/healthz and /readyz on every daemon's metrics port (what Kubernetes probes), against real
daemon processes: ready when each daemon can do its job, not ready when a link it needs is
gone, ready again when it is back, and alive throughout."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.cluster import Cluster, Proc

PROBE_DEADLINE_S = 30.0


def base_url(proc: Proc) -> str:
    endpoints = proc.wait_ready()["endpoints"]
    assert isinstance(endpoints, dict)
    return str(endpoints["metrics"]).removesuffix("/metrics")


def probe(proc: Proc, path: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(base_url(proc) + path, timeout=5)
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return response.status_code, body


def wait_for(proc: Proc, path: str, status: int) -> dict[str, Any]:
    """Probe until ``path`` answers ``status`` (a deadline, no fixed sleep)."""
    end = time.monotonic() + PROBE_DEADLINE_S
    while True:
        code, body = probe(proc, path)
        if code == status:
            return body
        if time.monotonic() > end:
            raise AssertionError(f"{proc.name}{path}: {code} {body}, expected {status}")
        time.sleep(0.05)  # the probe's polling interval


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("health"), workers=1)
    try:
        yield c
    finally:
        c.stop()


READY_CHECKS = {
    "registry": {"started", "accepting", "database"},
    "orchestrator": {"started", "accepting", "registry"},
    "gateway": {"started", "accepting", "orchestrator"},
    "worker-1": {"started", "accepting", "model_loaded", "registered"},
}


@pytest.mark.parametrize("name", sorted(READY_CHECKS))
def test_every_daemon_is_alive_and_ready_on_its_metrics_port(cluster: Cluster, name: str) -> None:
    proc = cluster.procs[name]
    body = wait_for(proc, "/readyz", 200)
    assert body["status"] == "ready"
    assert body["daemon"] == name.split("-")[0]
    assert set(body["checks"]) == READY_CHECKS[name]
    assert all(body["checks"].values())
    code, alive = probe(proc, "/healthz")
    assert code == 200
    assert alive["status"] == "ok"
    assert alive["checks"]["loop"] is True  # the loop turned within the stall limit
    if name == "worker-1":
        assert alive["checks"]["engine"] is True
        assert body["model"].startswith("stories260K")
    if name == "registry":
        assert alive["checks"]["database"] is True
    # /metrics is still Prometheus' text, on the same port
    metrics = httpx.get(base_url(proc) + "/metrics", timeout=5)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "haif_malformed_frames_total" in metrics.text


def test_orchestrator_is_ready_only_with_its_registry_link(cluster: Cluster) -> None:
    orchestrator = cluster.procs["orchestrator"]
    wait_for(orchestrator, "/readyz", 200)
    cluster.procs["registry"].kill()
    body = wait_for(orchestrator, "/readyz", 503)
    assert body["checks"]["registry"] is False
    assert body["reason"] == "not registry"
    assert probe(orchestrator, "/healthz")[0] == 200  # not a reason to restart it
    # the gateway still has its orchestrator: it stays ready (known models are cached)
    assert probe(cluster.procs["gateway"], "/readyz")[0] == 200
    cluster.start("registry", ["daemon", "registry", "--bind", cluster.registry])
    body = wait_for(orchestrator, "/readyz", 200)
    assert body["checks"]["registry"] is True


def test_gateway_and_worker_follow_their_orchestrator(cluster: Cluster) -> None:
    gateway, worker = cluster.procs["gateway"], cluster.procs["worker-1"]
    wait_for(gateway, "/readyz", 200)
    wait_for(worker, "/readyz", 200)
    old = cluster.procs["orchestrator"]
    args = old.args
    old.kill()
    body = wait_for(gateway, "/readyz", 503)
    assert body["checks"] == {"started": True, "accepting": True, "orchestrator": False}
    body = wait_for(worker, "/readyz", 503)
    assert body["checks"]["registered"] is False
    assert body["checks"]["model_loaded"] is True
    assert probe(worker, "/healthz")[0] == 200
    assert probe(gateway, "/healthz")[0] == 200
    # a new orchestrator on the same address: the worker registers again, the gateway finds it
    cluster.start("orchestrator", [*args, "--bind", cluster.orchestrator])
    wait_for(cluster.procs["orchestrator"], "/readyz", 200)
    assert wait_for(worker, "/readyz", 200)["checks"]["registered"] is True
    wait_for(gateway, "/readyz", 200)
    cluster.wait_workers(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_worker_is_alive_but_not_ready_until_registered(tmp_path: Path, model_path: Path) -> None:
    """A worker with its model loaded and no orchestrator to register with."""
    env = {**os.environ, "HAIF_HOME": str(tmp_path / "home"), "HAIF_THREADS": "1"}
    orchestrator = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    worker = Proc(
        "lonely-worker",
        ["worker", "--orchestrator", orchestrator, "--model", str(model_path)],
        tmp_path,
        env,
    )
    try:
        code, body = probe(worker, "/readyz")
        assert code == 503
        assert body["checks"]["model_loaded"] is True
        assert body["checks"]["registered"] is False
        assert body["reason"] == "not registered"
        code, alive = probe(worker, "/healthz")
        assert code == 200
        assert alive["checks"]["engine"] is True
    finally:
        assert worker.stop() == 0


def test_registry_readiness_follows_its_database(tmp_path: Path, postgres_url: str) -> None:
    """Its Postgres connection cut: not ready (within a probe interval), still alive."""
    name = f"haif-health-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}&application_name={name}"
    env = {**os.environ, "HAIF_HOME": str(tmp_path / "home"), "HAIF_REGISTRY_URL": url}
    registry = Proc("registry", ["daemon", "registry"], tmp_path, env)
    try:
        assert wait_for(registry, "/readyz", 200)["checks"]["database"] is True
        base = postgres_url.split("?")[0]
        with psycopg.connect(base, autocommit=True) as conn:
            cut = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            ).fetchall()
        assert cut == [(True,)]
        body = wait_for(registry, "/readyz", 503)
        assert body["checks"]["database"] is False
        code, alive = probe(registry, "/healthz")
        assert code == 200  # failing for less than DB_DEAD_S: wait, do not restart yet
        assert alive["checks"]["database"] is True
    finally:
        registry.kill(signal.SIGTERM)
        registry.stop()
