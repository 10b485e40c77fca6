"""Every daemon's /metrics: valid for promtool, and counting what really happened."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from haifctl import wire
from tests.cluster import Cluster
from tests.conftest import require


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("metrics")
    c = Cluster(workdir, workers=1, bridge_env={})
    try:
        yield c
    finally:
        c.stop()


def scrape(cluster: Cluster, name: str) -> str:
    endpoints = cluster.procs[name].wait_ready()["endpoints"]
    assert isinstance(endpoints, dict)
    return httpx.get(str(endpoints["metrics"]), timeout=10).text


def value(text: str, sample: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def traffic(cluster: Cluster) -> None:
    with cluster.client() as client:
        for i in range(5):
            msgs = list(
                client.stream(
                    {"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True, "seed": i}
                )
            )
            assert isinstance(msgs[-1], wire.Done)
        bad = list(client.stream({"prompt": "x", "max_tokens": "many"}))
        assert isinstance(bad[-1], wire.Error)
    assert (
        httpx.post(
            f"{cluster.bridge}/v1/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=30
        ).status_code
        == 200
    )
    assert (
        httpx.post(
            f"{cluster.bridge}/v1/completions", json={"model": "ghost", "prompt": "x"}, timeout=30
        ).status_code
        == 404
    )
    invalid = {"prompt": "x", "max_tokens": -1}
    response = httpx.post(f"{cluster.bridge}/v1/completions", json=invalid, timeout=30)
    assert response.status_code == 400
    ctx = zmq.Context()
    sock = cluster.dealer(ctx, cluster.gateway)  # authenticated, and still garbage
    sock.setsockopt(zmq.LINGER, 1000)
    sock.send(b"\x00garbage")
    sock.close()
    ctx.term()
    # Garbage on one connection is not ordered with requests on others: probe the counter.
    end = time.monotonic() + 10
    while value(scrape(cluster, "gateway"), "haif_malformed_frames_total", daemon="gateway") < 1:
        assert time.monotonic() < end
        time.sleep(0.02)


@pytest.mark.parametrize("daemon", ["registry", "orchestrator", "gateway", "bridge", "worker-1"])
def test_promtool_accepts_every_daemons_metrics(
    cluster: Cluster, traffic: None, daemon: str
) -> None:
    promtool = require("promtool", "prometheus")
    text = scrape(cluster, daemon)
    assert "haif_" in text
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).strip() == ""


def test_metrics_count_what_happened(cluster: Cluster, traffic: None) -> None:
    gateway = scrape(cluster, "gateway")
    assert value(gateway, "haif_requests_total", daemon="gateway", outcome="ok") >= 6
    assert value(gateway, "haif_requests_total", daemon="gateway", outcome="invalid_request") >= 1
    assert value(gateway, "haif_rejected_requests_total", reason="model_not_found") >= 1
    assert value(gateway, "haif_malformed_frames_total", daemon="gateway") >= 1
    assert value(gateway, "haif_time_to_first_token_seconds_count", daemon="gateway") >= 6
    assert value(gateway, "haif_request_duration_seconds_count", daemon="gateway") >= 6

    worker = scrape(cluster, "worker-1")
    assert value(worker, "haif_generated_tokens_total", model="stories260K:1") >= 54
    assert value(worker, "haif_prompt_tokens_total", model="stories260K:1") == 5 * 5 + 2
    assert value(worker, "haif_time_per_output_token_seconds_count") >= 6
    assert value(worker, "haif_model_load_seconds", model="stories260K:1") > 0

    orch = scrape(cluster, "orchestrator")
    assert value(orch, "haif_workers", state="ready") == 1
    assert value(orch, "haif_worker_slots", worker="worker-1", kind="total") == 1
    assert value(orch, "haif_queue_wait_seconds_count", model="stories260K:1") >= 6
    assert value(orch, "haif_queue_depth", model="stories260K:1") == 0

    bridge = scrape(cluster, "bridge")
    assert (
        value(
            bridge, "haif_requests_total", daemon="bridge", route="/v1/completions", outcome="200"
        )
        >= 1
    )
    assert (
        value(
            bridge, "haif_requests_total", daemon="bridge", route="/v1/completions", outcome="404"
        )
        >= 1
    )

    assert (
        value(bridge, "haif_rejected_requests_total", daemon="bridge", reason="invalid_request")
        >= 1
    )

    registry = scrape(cluster, "registry")
    assert value(registry, "haif_requests_total", daemon="registry", route="resolve") >= 1
