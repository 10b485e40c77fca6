"""Live scaling as a user runs it: `haifctl scale` and `haifctl up --workers N` on a running
cluster of real daemons, with streams under way while workers retire."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from haifctl.daemon.state import pid_alive
from tests.e2e.conftest import Run

TOKENS = 1900  # long enough that the streams are still running when their workers retire
STREAMS = 6


def status(haifctl: Run) -> dict[str, Any]:
    proc = haifctl("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def worker_ids(info: dict[str, Any]) -> list[str]:
    return sorted(w["worker_id"] for w in info["workers"])


def daemon_names(info: dict[str, Any]) -> list[str]:
    return sorted(d["name"] for d in info["daemons"] if d["name"].startswith("worker"))


def events(home: Path, name: str) -> list[dict[str, Any]]:
    path = home / "logs" / f"{name}.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def up(haifctl: Run) -> Any:
    started = haifctl(
        "up", "--workers", "1", "--heartbeat-timeout", "1", "--bridge-bind", "127.0.0.1:0"
    )
    assert started.returncode == 0, started.stderr + started.stdout
    yield
    assert haifctl("down").returncode == 0


def stream(bridge: str, begun: threading.Event, results: list[dict[str, Any]]) -> None:
    """One streamed completion through the OpenAI SDK; records how it ended."""
    from openai import OpenAI

    client = OpenAI(base_url=bridge + "/v1", api_key="unused", max_retries=0)
    text, finish, usage = [], None, None
    try:
        chunks = client.completions.create(
            model="stories260K",
            prompt="Once upon a time",
            max_tokens=TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            begun.set()
            for choice in chunk.choices:
                text.append(choice.text)
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        results.append({"finish": finish, "usage": usage, "text": "".join(text)})
    except Exception as exc:  # recorded, so that the test says which stream failed and how
        results.append({"error": repr(exc)})
    finally:
        begun.set()


def test_scale_up_then_down_under_load_loses_no_stream(haifctl: Run, home: Path, up: None) -> None:
    before = status(haifctl)
    assert worker_ids(before) == ["worker-1"]
    assert before["workers_target"] == 1

    grown = haifctl("scale", "workers=3")
    assert grown.returncode == 0, grown.stderr + grown.stdout
    assert "starting worker-2" in grown.stdout
    assert "starting worker-3" in grown.stdout
    info = status(haifctl)  # `scale` returns once the new workers have joined
    assert worker_ids(info) == ["worker-1", "worker-2", "worker-3"]
    assert daemon_names(info) == ["worker-1", "worker-2", "worker-3"]
    assert info["workers_target"] == 3
    assert all(d["state"] == "running" for d in info["daemons"])
    top = json.loads(haifctl("top", "--once", "--json").stdout)
    assert sorted(w["worker_id"] for w in top["workers"]) == ["worker-1", "worker-2", "worker-3"]
    assert "worker-3" in haifctl("status").stdout

    # streams on every worker, then down to one: the retiring workers finish theirs
    bridge = next(d["endpoint"] for d in info["daemons"] if d["name"] == "bridge")
    results: list[dict[str, Any]] = []
    begun = [threading.Event() for _ in range(STREAMS)]
    threads = [
        threading.Thread(target=stream, args=(bridge, e, results), daemon=True) for e in begun
    ]
    for t in threads:
        t.start()
    for e in begun:
        assert e.wait(60), "a stream did not start"
    pids = {d["name"]: d["pid"] for d in info["daemons"]}
    shrunk = haifctl("scale", "--workers", "1", "--json")
    assert shrunk.returncode == 0, shrunk.stderr + shrunk.stdout
    for t in threads:
        t.join(120)
    assert len(results) == STREAMS
    for r in results:
        assert "error" not in r, r
        assert r["finish"] == "length"
        assert r["usage"].completion_tokens == TOKENS
        assert len(r["text"]) > TOKENS  # the whole story arrived, not just its count

    scaled = json.loads(shrunk.stdout)
    assert scaled["was"] == 3
    assert scaled["workers"] == 1
    retired = {r["name"]: r for r in scaled["retired"]}
    assert sorted(retired) == ["worker-2", "worker-3"]
    assert all(r["returncode"] == 0 for r in retired.values())  # they drained; none was killed
    # they had streams to finish when they were told to go: the scale was a real test
    drained = [
        e["in_flight"] for name in retired for e in events(home, name) if e.get("msg") == "draining"
    ]
    assert len(drained) == 2
    assert sum(drained) > 0

    after = status(haifctl)
    assert worker_ids(after) == ["worker-1"]
    assert daemon_names(after) == ["worker-1"]
    assert after["workers_target"] == 1
    assert {r["name"] for r in after["retired"]} == {"worker-2", "worker-3"}
    assert not pid_alive(pids["worker-2"])
    assert not pid_alive(pids["worker-3"])
    # and the supervisor did not start them again: no start after their retirement
    supervisor = events(home, "supervisor")
    for name in retired:
        gone = max(
            i
            for i, e in enumerate(supervisor)
            if e.get("msg") == "worker retired" and e.get("target") == name
        )
        assert not [
            e for e in supervisor[gone:] if e.get("msg") == "started" and e.get("target") == name
        ]
    # worker-1 still serves
    served = json.loads(haifctl("infer", "Once", "-n", "8", "-o", "json").stdout)
    assert served["worker"] == "worker-1"
    assert served["usage"]["completion_tokens"] == 8


def test_up_on_a_running_cluster_scales_or_refuses(
    haifctl: Run, home: Path, model_path: Path, up: None
) -> None:
    assert haifctl("models", "register", str(model_path), "--name", "other").returncode == 0
    info = status(haifctl)
    bridge = next(d["endpoint"] for d in info["daemons"] if d["name"] == "bridge")

    # a flag that needs a restart refuses the whole command, scaling included
    refused = haifctl("up", "--workers", "2", "--model", "other", "--gateways", "2")
    assert refused.returncode == 2
    lines = refused.stderr.splitlines()
    assert "error: --gateways: the running cluster has 1; it cannot change while it runs" in lines
    assert (
        "error: --model: the running cluster has stories260K:1; it cannot change while it runs"
        in lines
    )
    assert lines[-1].startswith(
        "hint: these apply only when the cluster starts: haifctl down first"
    )
    assert worker_ids(status(haifctl)) == ["worker-1"]
    assert status(haifctl)["workers_target"] == 1

    # what runs already is no change: the same model by another spelling, the bridge's address
    same = haifctl(
        "up",
        "--workers",
        "2",
        "--model",
        "stories260K",
        "--bridge-bind",
        bridge.removeprefix("http://"),
        "--heartbeat-timeout",
        "1",
    )
    assert same.returncode == 0, same.stderr + same.stdout
    assert "scaling workers 1 -> 2" in same.stdout
    assert worker_ids(status(haifctl)) == ["worker-1", "worker-2"]

    again = haifctl("up")  # no --workers: nothing to scale
    assert again.returncode == 0
    assert "cluster already running" in again.stdout
    assert worker_ids(status(haifctl)) == ["worker-1", "worker-2"]
    assert "already has 2 worker(s)" in haifctl("scale", "workers=2").stdout

    for bad, message in (
        (["gateways=2"], "only workers can be scaled"),
        (["workers=0"], "give a whole number of 1 or more"),
        (["workers"], "is not NAME=N"),
        (["workers=2", "--workers", "3"], "disagree"),
        ([], "say how many workers"),
    ):
        proc = haifctl("scale", *bad)
        assert proc.returncode == 2, bad
        assert message in proc.stderr, proc.stderr


def test_scale_without_a_cluster(haifctl: Run) -> None:
    proc = haifctl("scale", "workers=2")
    assert proc.returncode == 3
    assert "error: no cluster is running" in proc.stderr
