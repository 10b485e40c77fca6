"""`haifctl up --gateways N` with Redis, and `haifctl usage`, as a user runs them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from haifctl.daemon.state import pid_alive
from tests.e2e.conftest import Run

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_up_with_two_gateways_sharing_redis_and_usage(
    haifctl: Run, home: Path, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAIF_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("HAIF_REDIS_PREFIX", redis_prefix)
    up = haifctl("up", "--gateways", "2", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        assert "gateway-2" in up.stdout
        info = json.loads(haifctl("status", "--json").stdout)
        daemons = {d["name"]: d for d in info["daemons"]}
        assert {"gateway", "gateway-2"} <= set(daemons)
        for name in ("gateway", "gateway-2"):
            assert daemons[name]["state"] == "running"
            ready = httpx.get(daemons[name]["metrics"].replace("/metrics", "/readyz"), timeout=5)
            assert ready.json()["limits"] == "shared", ready.text
        # one request through each gateway, one through the HTTP bridge
        for name in ("gateway", "gateway-2"):
            served = haifctl(
                "infer",
                "Once",
                "-n",
                "3",
                "-o",
                "json",
                env={"GATEWAY_URL": daemons[name]["endpoint"]},
            )
            assert served.returncode == 0, served.stderr
            assert json.loads(served.stdout)["served_by"] == "cluster"
        http = httpx.post(
            daemons["bridge"]["endpoint"] + "/v1/completions",
            json={"model": "stories260K", "prompt": "Once", "max_tokens": 3},
            timeout=30,
        )
        assert http.status_code == 200, http.text
        ready = httpx.get(daemons["bridge"]["endpoint"] + "/readyz", timeout=10).json()
        assert ready["gateways"] == "2/2", ready
        # the bridge holds a link to each gateway, and its requests take turns over them
        before = {name: served_by(daemons[name]) for name in ("gateway", "gateway-2")}
        for _ in range(6):
            more = httpx.post(
                daemons["bridge"]["endpoint"] + "/infer",
                json={"prompt": "Once", "params": {"max_tokens": 2}},
                timeout=30,
            )
            assert more.status_code == 200, more.text
        for name in ("gateway", "gateway-2"):
            assert served_by(daemons[name]) - before[name] == 3, name
        # usage, read through the cluster's registry daemon
        end = time.monotonic() + 30
        while True:
            usage = haifctl("usage", "--by", "key", "--json")
            assert usage.returncode == 0, usage.stderr
            totals = {t["name"]: t for t in json.loads(usage.stdout)["totals"]}
            if sum(t["requests"] for t in totals.values()) >= 9:
                break
            assert time.monotonic() < end, totals
            time.sleep(0.2)  # polling the probe
        assert totals["local"]["requests"] == 7  # the bridge's key id on an open loopback bridge
        assert totals["local"]["completion_tokens"] == 3 + 6 * 2
        assert sum(t["requests"] for t in totals.values()) == 9
    finally:
        down = haifctl("down")
        assert down.returncode == 0, down.stderr
    assert not any(pid_alive(d["pid"]) for d in daemons.values())


def served_by(daemon: dict[str, object]) -> float:
    """Inference requests a gateway has answered, from its /metrics."""
    text = httpx.get(str(daemon["metrics"]), timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("haif_requests_total{") and '"infer"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
