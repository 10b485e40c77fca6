"""`haifctl top`: one snapshot, JSON, and the live view in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.e2e.conftest import HAIFCTL, Run


@pytest.fixture
def cluster(haifctl: Run) -> Iterator[None]:
    up = haifctl("up", "--workers", "2", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr
    try:
        yield
    finally:
        haifctl("down")


def test_top_once_and_json(haifctl: Run, cluster: None) -> None:
    for i in range(6):
        assert haifctl("infer", "Once upon a time", "-n", "20", "--seed", str(i)).returncode == 0
    snap = json.loads(haifctl("top", "--json").stdout)
    assert [d["name"] for d in snap["daemons"]][:4] == [
        "registry",
        "orchestrator",
        "gateway",
        "bridge",
    ]
    assert sorted(w["worker_id"] for w in snap["workers"]) == ["worker-1", "worker-2"]
    window = snap["window"]
    assert window["requests"] == 6
    assert window["errors"] == 0
    assert window["requests_per_s"] > 0
    assert window["tokens_per_s"] > 0
    assert 0 < window["latency_p50_ms"] <= window["latency_p95_ms"]
    assert 0 < window["ttft_p50_ms"] <= window["ttft_p95_ms"]
    assert snap["queues"] == {"stories260K:1": 0}
    text = haifctl("top", "--once", "--sort", "served").stdout
    assert "req/s" in text
    assert "worker-1" in text
    assert "sorted by served" in text
    assert "q: quit" not in text  # no keys work in a snapshot: none are offered
    bad = haifctl("top", "--once", "--sort", "colour")
    assert bad.returncode == 2


def test_top_without_a_cluster(haifctl: Run) -> None:
    proc = haifctl("top", "--once")
    assert proc.returncode == 3
    assert "no cluster is running" in proc.stderr


def test_top_live_in_a_terminal(haifctl: Run, cluster: None, home: Path) -> None:
    tmux = require("tmux", "tmux")
    session = f"haif-top-{os.getpid()}"
    env_cmd = f"HAIF_HOME={home} {HAIFCTL} top --interval 0.2"
    subprocess.run(
        [tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "40", env_cmd], check=True
    )

    def screen() -> str:
        return subprocess.run(
            [tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout

    def wait_for(text: str) -> str:
        end = time.monotonic() + 15
        while text not in (shown := screen()):
            assert time.monotonic() < end, shown
            time.sleep(0.05)
        return shown

    try:
        shown = wait_for("sorted by name")
        assert "worker-2" in shown
        subprocess.run([tmux, "send-keys", "-t", session, "s"], check=True)
        wait_for("sorted by load")
        subprocess.run([tmux, "send-keys", "-t", session, "q"], check=True)
        end = time.monotonic() + 10
        while (
            subprocess.run([tmux, "has-session", "-t", session], capture_output=True).returncode
            == 0
        ):
            assert time.monotonic() < end, "top did not quit on q"
            time.sleep(0.05)
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)
