"""The base daemon's /healthz and /readyz, served on its metrics port over real HTTP: not ready
while starting, a stalled loop fails liveness, draining fails readiness, stop() closes it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from haifctl.daemon.base import Daemon


class Loop(Daemon):
    """A daemon with nothing to serve, whose tick can be made to hang (a stuck loop) and
    whose work in flight the test decides."""

    name = "loop"
    tick_s = 0.01

    def __init__(self) -> None:
        super().__init__()
        self.hang = threading.Event()
        self.hanging = threading.Event()
        self.release = threading.Event()
        self.busy = 0

    def start(self) -> None:
        pass

    def on_tick(self, now: float) -> None:
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(30)

    def in_flight(self) -> int:
        return self.busy


@pytest.fixture
def daemon() -> Iterator[Loop]:
    d = Loop()
    d.metrics_port = 0
    d.serve_metrics()
    yield d
    d.release.set()
    d.force_exit = d.should_exit = True
    d.stop()


def url(d: Daemon, path: str) -> str:
    return d.endpoints["metrics"].removesuffix("/metrics") + path


def get(d: Daemon, path: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(url(d, path), timeout=5)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def wait_for(d: Daemon, path: str, status: int) -> dict[str, Any]:
    end = time.monotonic() + 10
    while True:
        code, body = get(d, path)
        if code == status:
            return body
        assert time.monotonic() < end, f"{path}: {code} {body}, expected {status}"
        time.sleep(0.01)  # the probe's polling interval


def test_starting_is_alive_and_not_ready(daemon: Loop) -> None:
    assert get(daemon, "/healthz") == (200, {"status": "ok", "daemon": "loop", "checks": {}})
    code, body = get(daemon, "/readyz")
    assert code == 503
    assert body["checks"] == {"started": False, "accepting": True}
    assert body["reason"] == "not started"
    daemon.announce_ready()
    code, body = get(daemon, "/readyz")
    assert code == 200
    assert body == {
        "status": "ready",
        "daemon": "loop",
        "checks": {"started": True, "accepting": True},
    }
    assert "haif_malformed_frames_total" in httpx.get(url(daemon, "/metrics")).text


def test_a_stalled_loop_fails_liveness_until_it_turns_again(daemon: Loop) -> None:
    daemon.stall_s = 0.3
    daemon.announce_ready()
    thread = threading.Thread(target=daemon.serve, daemon=True)
    thread.start()
    assert wait_for(daemon, "/healthz", 200)["checks"] == {"loop": True}
    daemon.hang.set()
    assert daemon.hanging.wait(10)
    body = wait_for(daemon, "/healthz", 503)
    assert body["status"] == "failing"
    assert body["checks"] == {"loop": False}
    daemon.hang.clear()
    daemon.release.set()
    wait_for(daemon, "/healthz", 200)
    daemon.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def test_draining_is_alive_and_not_ready(daemon: Loop) -> None:
    daemon.announce_ready()
    daemon.busy = 1  # a request in flight keeps the drain going
    thread = threading.Thread(target=daemon.serve, daemon=True)
    thread.start()
    wait_for(daemon, "/readyz", 200)
    daemon.should_exit = True
    body = wait_for(daemon, "/readyz", 503)
    assert body["checks"]["accepting"] is False
    assert body["reason"] == "not accepting"
    assert get(daemon, "/healthz")[0] == 200
    daemon.busy = 0
    thread.join(10)
    assert not thread.is_alive()
    daemon.stop()
    with pytest.raises(httpx.ConnectError):  # gone: the probe's connection is refused
        httpx.get(url(daemon, "/healthz"), timeout=2)


def test_a_failing_check_is_a_failed_probe_not_a_dead_server(daemon: Loop) -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    daemon.ready_checks = broken  # type: ignore[method-assign]
    code, body = get(daemon, "/readyz")
    assert code == 503
    assert body == {"status": "error", "reason": "RuntimeError: boom"}
    assert get(daemon, "/healthz")[0] == 200
