"""Failure is normal: dead workers, a restarted orchestrator, workers joining from elsewhere."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from haifctl import wire
from haifctl.errors import Unavailable
from tests.cluster import HAIFCTL, Cluster, Proc

HEARTBEAT_TIMEOUT = 1.0


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    monkeypatch.setenv("HAIF_HOME", str(tmp_path / "home"))
    c = Cluster(tmp_path, workers=2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    yield c
    c.stop()


def run_requests(
    cluster: Cluster,
    n: int,
    max_tokens: int,
    results: dict[int, list[wire.Msg]],
    started: threading.Event | None = None,
) -> list[threading.Thread]:
    def one(i: int) -> None:
        with cluster.client() as client:
            msgs: list[wire.Msg] = []
            for msg in client.stream(
                {
                    "prompt": "Once upon a time",
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "seed": i,
                },
                timeout=60,
            ):
                msgs.append(msg)
            results[i] = msgs

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_kill_9_worker_mid_stream(cluster: Cluster) -> None:
    results: dict[int, list[wire.Msg]] = {}
    threads = run_requests(cluster, 12, 1500, results)
    # Wait until both workers are generating (probe the orchestrator's table), then kill one.
    with cluster.client() as client:
        end = time.monotonic() + 30
        while not all(w.busy for w in client.stats().workers):
            assert time.monotonic() < end
            time.sleep(0.005)
        cluster.procs["worker-1"].kill(signal.SIGKILL)
        killed_at = time.monotonic()
        # the dead worker leaves the table within the heartbeat timeout (plus a loop tick)
        while "worker-1" in {w.worker_id for w in client.stats().workers}:
            assert time.monotonic() - killed_at < HEARTBEAT_TIMEOUT + 1.0
            time.sleep(0.01)
        dropped_after = time.monotonic() - killed_at
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 12  # nothing hung
    lost = [m for m in results.values() if isinstance(m[-1], wire.Error)]
    done = [m for m in results.values() if isinstance(m[-1], wire.Done)]
    # at most the stream that worker-1 was running is lost, and it says so
    assert len(lost) <= 1
    for msgs in lost:
        error = msgs[-1]
        assert isinstance(error, wire.Error)
        assert error.code == "worker_lost"
        assert any(isinstance(m, wire.Chunk) for m in msgs)  # it had started streaming
    for msgs in done:
        final = msgs[-1]
        assert isinstance(final, wire.Done)
        assert final.completion_tokens == 1500
    assert len(done) >= 11
    assert dropped_after <= HEARTBEAT_TIMEOUT + 1.0
    # a restarted worker registers again and serves
    cluster.start_worker("worker-1").wait_ready()
    cluster.wait_workers(2, ids={"worker-1", "worker-2"})


def test_orchestrator_restart_workers_and_gateway_reconnect(cluster: Cluster) -> None:
    orch = cluster.procs["orchestrator"]
    orch.kill(signal.SIGKILL)
    orch.popen.wait()
    with cluster.client() as client:
        end = time.monotonic() + 10
        while client.ping().ready:  # the gateway notices its orchestrator is gone
            assert time.monotonic() < end
            time.sleep(0.05)
    restarted = cluster.start(
        "orchestrator",
        [
            "daemon",
            "orchestrator",
            "--registry",
            cluster.registry,
            "--bind",
            cluster.orchestrator,
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT),
        ],
    )
    assert restarted.endpoint() == cluster.orchestrator
    cluster.wait_workers(2, timeout=15)  # workers re-register on their own
    with cluster.client() as client:
        end = time.monotonic() + 10
        while not client.ping().ready:
            assert time.monotonic() < end
            time.sleep(0.05)
        msgs = list(client.stream({"prompt": "The cat", "max_tokens": 10}))
    assert isinstance(msgs[-1], wire.Done)


def test_remote_style_worker_joins_with_a_token_and_nothing_else(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A worker elsewhere has its own empty home (no registry, no config, no cluster keys):
    without a join token the orchestrator refuses it in the handshake; with the token that
    `haifctl join-token` prints on the cluster's machine, it joins and serves."""
    env = {**cluster.env, "HAIF_HOME": str(tmp_path / "elsewhere")}
    args = ["worker", "--orchestrator", cluster.orchestrator, "--model", "stories260K"]
    # With keys of its own (a cluster of its own, in its own home): refused in the handshake,
    # and counted.
    own = {**env, "HAIF_HOME": str(tmp_path / "stranger")}
    stranger = Proc("stranger", [*args, "--worker-id", "stranger"], tmp_path, own)
    cluster.procs["stranger"] = stranger
    end = time.monotonic() + 30
    while scrape_counter(cluster, "auth_refused_handshake") < 1:
        assert time.monotonic() < end, stranger.tail()
        time.sleep(0.05)
    assert not stranger.ready_file.exists()
    stranger.stop()

    made = subprocess.run(
        [HAIFCTL, "join-token", "--name", "remote-1"],
        env=cluster.env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.strip()
    assert token.startswith("haif1-")
    proc = Proc("remote-1", [*args, "--worker-id", "remote-1", "--join", token], tmp_path, env)
    cluster.procs["remote-1"] = proc
    proc.wait_ready()
    cluster.wait_workers(3)
    served_by = set()
    with cluster.client() as client:
        for i in range(6):
            msgs = list(client.stream({"prompt": "Once", "max_tokens": 5, "seed": i}))
            final = msgs[-1]
            assert isinstance(final, wire.Done)
            served_by.add(final.worker)
    assert "remote-1" in served_by
    assert not (tmp_path / "elsewhere" / "registry.db").exists()
    assert not (tmp_path / "elsewhere" / "keys").exists()  # it made no keys of its own

    # revoked: refused from its next connection on (a restart here)
    subprocess.run([HAIFCTL, "join-token", "--revoke", "remote-1"], env=cluster.env, check=True)
    refused = scrape_counter(cluster, "auth_refused_unknown_key")
    assert proc.stop() == 0  # drained
    cluster.wait_workers(2, timeout=HEARTBEAT_TIMEOUT + 5)
    again = Proc("remote-1", [*args, "--worker-id", "remote-1", "--join", token], tmp_path, env)
    cluster.procs["remote-1"] = again
    end = time.monotonic() + 30
    while scrape_counter(cluster, "auth_refused_unknown_key") <= refused:
        assert time.monotonic() < end, again.tail()
        time.sleep(0.05)


def scrape_counter(cluster: Cluster, name: str) -> int:
    """A counter of the orchestrator's, from its stats."""
    with cluster.client() as client:
        return client.stats().counters.get(name, 0)


def test_sigterm_to_a_worker_finishes_its_stream_first(cluster: Cluster) -> None:
    with cluster.client() as client:
        stream = client.stream(
            {"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}
        )
        first = next(stream)
        assert isinstance(first, wire.Chunk)
        worker = client.stats().workers
        busy = next(w.worker_id for w in worker if w.busy)
        cluster.procs[busy].kill(signal.SIGTERM)
        rest = list(stream)
    final = rest[-1]
    assert isinstance(final, wire.Done), final
    assert final.completion_tokens == 1900
    assert cluster.procs[busy].popen.wait(timeout=30) == 0
    # the orchestrator stops sending it work as soon as it says it is draining
    cluster.wait_workers(1, timeout=HEARTBEAT_TIMEOUT + 5)


def test_a_stream_whose_gateway_dies_ends_at_once(cluster: Cluster) -> None:
    """kill -9 of the gateway takes the requests it held with it: a client waiting on one hears
    so when the connection closes (it used to wait out its whole timeout, here 120 s).  After a
    gateway is back on its port, the same client's next stream is served."""
    workers = [cluster.procs[name] for name in ("worker-1", "worker-2")]
    with cluster.client() as client:
        warm = list(client.stream({"prompt": "Once", "max_tokens": 2}, timeout=60))
        assert isinstance(warm[-1], wire.Done)  # the connection is up and kept for reuse
        request = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
        messages = client.stream(request, timeout=120)
        try:
            first = next(messages)
            assert isinstance(first, wire.Chunk)
            for proc in workers:  # no more chunks: the stream stays in flight
                proc.kill(signal.SIGSTOP)
            cluster.procs["gateway"].kill(signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(Unavailable) as lost:
                for _ in messages:
                    pass
            waited = time.monotonic() - killed_at
        finally:
            for proc in workers:
                proc.kill(signal.SIGCONT)
        assert lost.value.code == "gateway_lost"
        assert waited < 10.0, waited
        cluster.start("gateway", [*cluster.gateway_args, "--bind", cluster.gateway]).wait_ready()
        again = list(client.stream({"prompt": "Once", "max_tokens": 4}, timeout=60))
        assert isinstance(again[-1], wire.Done)
        assert again[-1].completion_tokens == 4
