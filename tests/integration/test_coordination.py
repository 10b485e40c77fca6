"""Several gateways, one set of limits: rate limits, concurrency caps and revoked keys shared
through a real Redis; local limits when Redis goes away, shared again when it is back."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import zmq

from haifctl import wire
from haifctl.coordination import Coordinator, KeyLimits, LocalLimits
from haifctl.keys import KeyStore
from haifctl.security import BRIDGE
from tests.cluster import HAIFCTL, Cluster, Proc

REDIS_URL = "redis://127.0.0.1:6379/0"


OPEN: list[zmq.Socket[bytes]] = []  # the test's peers, closed by the ctx fixture


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    while OPEN:
        OPEN.pop().close(linger=0)
    context.destroy(linger=0)


def shared_env(monkeypatch: pytest.MonkeyPatch, url: str, prefix: str, **limits: str) -> None:
    """Every daemon the cluster starts inherits these (only gateways read them)."""
    monkeypatch.setenv("HAIF_REDIS_URL", url)
    monkeypatch.setenv("HAIF_REDIS_PREFIX", prefix)
    for name, value in limits.items():
        monkeypatch.setenv(name, value)


def wait_in_flight(prefix: str, key: str, n: int, timeout: float = 10.0) -> None:
    """Probe Redis until ``key`` holds ``n`` concurrency slots."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    end = time.monotonic() + timeout
    while client.zcard(f"{prefix}:inflight:{key}") != n:
        assert time.monotonic() < end, f"{key} never held {n} slots"
        time.sleep(0.02)
    client.close()


def second_gateway(cluster: Cluster, name: str = "gateway-2") -> str:
    return cluster.start(name, cluster.gateway_args).endpoint()


def metrics_of(proc: Proc) -> str:
    endpoints = proc.wait_ready()["endpoints"]
    assert isinstance(endpoints, dict)
    return httpx.get(str(endpoints["metrics"]), timeout=5).text


def metric(proc: Proc, name: str) -> float:
    for line in metrics_of(proc).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def readyz(proc: Proc) -> httpx.Response:
    """The gateway's /readyz, on its metrics port."""
    endpoints = proc.wait_ready()["endpoints"]
    assert isinstance(endpoints, dict)
    return httpx.get(str(endpoints["metrics"]).replace("/metrics", "/readyz"), timeout=5)


def wait_metric(proc: Proc, name: str, value: float, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while metric(proc, name) != value:
        assert time.monotonic() < end, f"{name} never became {value}: {proc.tail()}"
        time.sleep(0.05)  # polling a probe


class Bridge:
    """A peer holding the bridge's key, as the HTTP bridge talks to a gateway: each request
    names the API key id it checked."""

    def __init__(self, cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]], gateway: str):
        self.sock = cluster.dealer(ctx, gateway, BRIDGE)
        OPEN.append(self.sock)

    def send(self, key: str, max_tokens: int = 2) -> str:
        request_id = wire.new_id()
        request = wire.Infer(request={"prompt": "Once", "max_tokens": max_tokens}, client=key)
        self.sock.send(wire.encode(request, request_id, time.time() + 60))
        return request_id

    def finals(self, ids: set[str], timeout: float = 60.0) -> dict[str, wire.Msg]:
        """The final message (Done or Error) of each of ``ids``."""
        got: dict[str, wire.Msg] = {}
        end = time.monotonic() + timeout
        while set(got) != ids:
            remaining = end - time.monotonic()
            assert remaining > 0, f"missing {ids - set(got)}"
            assert self.sock.poll(int(remaining * 1000)), f"missing {ids - set(got)}"
            envelope = wire.decode(self.sock.recv())
            if envelope.id in ids and isinstance(envelope.msg, wire.Done | wire.Error):
                got[envelope.id] = envelope.msg
        return got

    def run(self, key: str, max_tokens: int = 2) -> wire.Msg:
        request_id = self.send(key, max_tokens)
        return self.finals({request_id})[request_id]


def outcome(msg: wire.Msg) -> str:
    return "ok" if isinstance(msg, wire.Done) else str(getattr(msg, "code", "?"))


# --- the limits alone -------------------------------------------------------------------------


def test_local_limits_cap_rate_and_concurrency_per_key() -> None:
    limits = LocalLimits(KeyLimits(rate_per_s=0.001, burst=3, max_concurrent=2))
    assert limits.admit("a1", "k", 0.0).admitted
    assert limits.admit("a2", "k", 0.0).admitted
    capped = limits.admit("a3", "k", 0.0)
    assert capped.reason == "too_many_concurrent"
    assert limits.admit("b1", "other", 0.0).admitted  # per key
    limits.release("a1", "k")
    assert limits.admit("a3", "k", 0.0).admitted  # the third token
    limits.release("a2", "k")
    limited = limits.admit("a4", "k", 0.0)
    assert limited.reason == "rate_limited"
    assert limited.wait_s > 0
    assert limits.in_flight == {"k": {"a3"}, "other": {"b1"}}


def test_an_unreachable_redis_decides_locally_at_once(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """Nothing listens on the port: every admission is still answered (by the local limits),
    and the change is reported."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    changes: list[bool] = []
    coordinator = Coordinator(
        KeyLimits(rate_per_s=0.001, burst=2),
        ctx,
        redis_url=f"redis://127.0.0.1:{port}/0",
        on_change=lambda shared, why: changes.append(shared),
    )
    try:
        assert coordinator.admit("r1", "k", 10.0) is None  # answered on the socket
        assert coordinator.admit("r2", "k", 10.0) is None
        assert coordinator.admit("r3", "k", 10.0) is None
        assert coordinator.socket is not None
        decisions = []
        end = time.monotonic() + 5
        while len(decisions) < 3:
            assert time.monotonic() < end
            if coordinator.socket.poll(100):
                decisions += list(coordinator.decisions())
        assert [d.admitted for d in decisions] == [True, True, False]
        assert coordinator.mode == "local-fallback"
        assert changes == [False]
    finally:
        coordinator.close()


def test_a_mistyped_redis_url_stops_the_gateway_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HAIF_HOME": str(tmp_path), "HAIF_REDIS_URL": "localhost:6379"}
    result = subprocess.run(
        [HAIFCTL, "daemon", "gateway", "--orchestrator", "tcp://127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "error: HAIF_REDIS_URL 'localhost:6379' is not a Redis URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_revocation_redis_does_not_record_changes_nothing(tmp_path: Path) -> None:
    """Redis unreachable: `keys revoke` fails (exit 3) and the key stays, so that retrying
    later revokes it everywhere; a mistyped URL is one error line too."""
    home = tmp_path / "home"
    _, record = KeyStore(home).create("kept")
    for url, code in ((f"redis://127.0.0.1:{free_port()}/0", 3), ("localhost:6379", 2)):
        env = {**os.environ, "HAIF_HOME": str(home), "HAIF_REDIS_URL": url}
        result = subprocess.run(
            [HAIFCTL, "keys", "revoke", "kept"], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == code, result.stderr
        assert result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr
        assert [k["id"] for k in KeyStore(home).list()] == [record["id"]]


# --- two real gateways ------------------------------------------------------------------------


def test_two_gateways_enforce_one_rate_limit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_prefix: str,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """Burst 6 and (almost) no refill: 6 requests pass in all, whichever gateway each goes to,
    where two gateways with limits of their own would let 12 through."""
    shared_env(monkeypatch, REDIS_URL, redis_prefix, HAIF_RATE_LIMIT="0.001", HAIF_RATE_BURST="6")
    cluster = Cluster(tmp_path, workers=1)
    try:
        second = second_gateway(cluster)
        a, b = Bridge(cluster, ctx, cluster.gateway), Bridge(cluster, ctx, second)
        results = []
        for i in range(12):
            results.append(outcome((a if i % 2 else b).run("key_shared")))
        assert results.count("ok") == 6, results
        assert results.count("rate_limited") == 6, results
        assert results[:6] == ["ok"] * 6  # the first six, from both gateways alike
        # another key has a bucket of its own
        assert outcome(a.run("key_other")) == "ok"
        assert metric(cluster.procs["gateway"], "haif_limits_shared") == 1
        assert metric(cluster.procs["gateway-2"], "haif_limits_shared") == 1
    finally:
        cluster.stop()


def test_two_gateways_enforce_one_concurrency_cap(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_prefix: str,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """Cap 2 per key: with one request held on each gateway (the worker is stopped), a third
    is refused on either; once they end, the key may send again."""
    shared_env(monkeypatch, REDIS_URL, redis_prefix, HAIF_MAX_CONCURRENT_PER_KEY="2")
    cluster = Cluster(tmp_path, workers=1, heartbeat_timeout=30.0)
    try:
        second = second_gateway(cluster)
        a, b = Bridge(cluster, ctx, cluster.gateway), Bridge(cluster, ctx, second)
        worker = cluster.procs["worker-1"]
        worker.kill(signal.SIGSTOP)
        try:
            held = [a.send("key_c"), b.send("key_c")]
            wait_in_flight(redis_prefix, "key_c", 2)  # both admitted, through Redis
            third = b.finals({b.send("key_c")})
            assert [outcome(m) for m in third.values()] == ["too_many_concurrent"]
            fourth = a.finals({a.send("key_c")})
            assert [outcome(m) for m in fourth.values()] == ["too_many_concurrent"]
        finally:
            worker.kill(signal.SIGCONT)
        assert outcome(a.finals({held[0]})[held[0]]) == "ok"
        assert outcome(b.finals({held[1]})[held[1]]) == "ok"
        assert outcome(b.run("key_c")) == "ok"  # the slots were given back
    finally:
        cluster.stop()


def test_a_revoked_key_is_refused_by_every_gateway_within_a_second(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_prefix: str,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    shared_env(monkeypatch, REDIS_URL, redis_prefix)
    cluster = Cluster(tmp_path, workers=1)
    try:
        second = second_gateway(cluster)
        gateways = [Bridge(cluster, ctx, cluster.gateway), Bridge(cluster, ctx, second)]
        _, record = KeyStore(tmp_path / "home").create("doomed")
        for gateway in gateways:
            assert outcome(gateway.run(record["id"])) == "ok"
        revoke = subprocess.run(
            [HAIFCTL, "keys", "revoke", "doomed"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        revoked_at = time.monotonic()
        assert revoke.returncode == 0, revoke.stderr
        assert "every gateway" in revoke.stdout
        for gateway in gateways:
            while outcome(gateway.run(record["id"])) != "key_revoked":
                assert time.monotonic() - revoked_at < 1.0, "revocation not seen in a second"
        assert outcome(gateways[0].run("key_other")) == "ok"
    finally:
        cluster.stop()


# --- Redis goes away and comes back ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A redis-server of this test's own (the machine's shared one is never restarted)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    end = time.monotonic() + 15
    while True:  # readiness probe
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            pass
        assert proc.poll() is None, "redis-server exited"
        assert time.monotonic() < end, "redis-server did not answer"
        time.sleep(0.02)
    client.close()
    return proc


def test_a_redis_restart_under_load_loses_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Clients keep sending while Redis is killed and started again: every request is answered
    with its completion; the gateway falls back to local limits (metric 0, logged, /readyz
    says so) and shares them again once Redis is back."""
    port = free_port()
    server = start_redis(port, tmp_path)
    shared_env(
        monkeypatch,
        f"redis://127.0.0.1:{port}/0",
        "haif",
        HAIF_MAX_CONCURRENT_PER_KEY="8",
        HAIF_RATE_LIMIT="100000",  # the clients send as fast as they can: never limited here
        HAIF_RATE_BURST="100000",
    )
    cluster = Cluster(tmp_path, workers=1)
    stop = threading.Event()
    results: list[str] = []
    errors: list[BaseException] = []

    def load(n: int) -> None:
        client = Bridge(cluster, ctx, cluster.gateway)
        try:
            while not stop.is_set():
                results.append(outcome(client.run(f"key_{n}")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    gateway = cluster.procs["gateway"]
    try:
        wait_metric(gateway, "haif_limits_shared", 1)
        for thread in threads:
            thread.start()
        server.kill()
        server.wait()
        wait_metric(gateway, "haif_limits_shared", 0)
        away = readyz(gateway)
        assert away.status_code == 200  # still ready: no request fails for want of Redis
        assert away.json()["limits"] == "local-fallback"
        during = len(results)
        end = time.monotonic() + 10
        while len(results) < during + 20:  # requests keep completing without Redis
            assert time.monotonic() < end
            time.sleep(0.02)
        server = start_redis(port, tmp_path)
        wait_metric(gateway, "haif_limits_shared", 1)
        assert readyz(gateway).json()["limits"] == "shared"
        fallbacks = metric(gateway, "haif_limits_fallbacks_total")
        after = len(results)
        end = time.monotonic() + 10
        while len(results) < after + 20:
            assert time.monotonic() < end
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        server.kill()
        server.wait()
        cluster.stop()
    assert not errors
    assert len(results) > 40
    assert set(results) == {"ok"}, {r for r in results if r != "ok"}
    assert metric_from_log(gateway, "redis unreachable: local limits") >= 1
    assert metric_from_log(gateway, "limits shared through redis") >= 2
    assert fallbacks >= 1


def test_a_lone_gateway_keeps_its_limits_in_process(tmp_path: Path) -> None:
    """No Redis configured: the limits are local, and /readyz says so."""
    cluster = Cluster(tmp_path, workers=1)
    try:
        body = readyz(cluster.procs["gateway"]).json()
        assert body["limits"] == "local"
        assert body["usage_pending"] == 0
        assert metric(cluster.procs["gateway"], "haif_limits_shared") == 0
    finally:
        cluster.stop()


def metric_from_log(proc: Proc, message: str) -> int:
    return sum(1 for event in proc.log_events() if event.get("msg") == message)
