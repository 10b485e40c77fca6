"""A real cluster: registry, orchestrator, gateway and workers as separate processes on loopback."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from haifctl import wire
from haifctl.client import ClusterClient
from tests.cluster import Cluster

HEARTBEAT_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    c = Cluster(workdir, workers=2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    try:
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), codes  # SIGTERM drains and exits cleanly


def complete(client: ClusterClient, **request: object) -> tuple[str, wire.Done | wire.Error]:
    text, last = [], None
    for msg in client.stream(request):
        if isinstance(msg, wire.Chunk):
            text.append(msg.text)
        else:
            last = msg
    assert last is not None
    return "".join(text), last


def test_32_concurrent_requests_are_answered_and_spread(cluster: Cluster) -> None:
    results: dict[int, tuple[str, wire.Done | wire.Error]] = {}

    def one(i: int) -> None:
        with cluster.client() as client:
            results[i] = complete(
                client, prompt="Once upon a time", max_tokens=24, seed=i, ignore_eos=True
            )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32
    for text, done in results.values():
        assert isinstance(done, wire.Done), done
        assert done.completion_tokens == 24
        assert done.model == "stories260K:1"
        assert len(text.split()) > 5
    by_worker = Counter(done.worker for _, done in results.values())
    assert set(by_worker) == {"worker-1", "worker-2"}, by_worker
    # the same seed gives the same text whichever worker ran it
    with cluster.client() as client:
        again = complete(client, prompt="Once upon a time", max_tokens=24, seed=3, ignore_eos=True)
    assert again[0] == results[3][0]


def test_invalid_requests_are_refused_by_the_gateway(cluster: Cluster) -> None:
    with cluster.client() as client:
        cases = [
            ({"prompt": "x", "max_tokens": "lots"}, "invalid_request", "max_tokens"),
            ({"prompt": "x", "max_tokens": 10**6}, "invalid_request", "over the limit"),
            ({"prompt": "x" * 300_000}, "prompt_too_large", "limit"),
            ({"model": "ghost", "prompt": "x"}, "model_not_found", "ghost"),
            ({"messages": []}, "invalid_request", "at least one"),
        ]
        for request, code, words in cases:
            _, last = complete(client, **request)
            assert isinstance(last, wire.Error), request
            assert last.code == code
            assert words in last.message
        stats = client.stats()
    assert stats.counters["gateway_rejected_invalid_request"] >= 3


def test_garbage_on_every_socket_is_dropped(cluster: Cluster) -> None:
    ctx = zmq.Context()
    valid = wire.encode(wire.Ping(), "x")
    junk = [
        [b""],
        [b"\x00\xff garbage"],
        [valid[:-3]],  # truncated
        [b"\x91" * (wire.MAX_FRAME_BYTES + 10)],  # oversized
        [valid, valid],  # too many frames
        [wire.encode(wire.Chunk(text="x", n_tokens=1), "nobody")],  # valid but unexpected
        [valid.replace(b"\x01", b"\x07", 1)],  # wrong protocol version
    ]
    try:
        for address in (cluster.registry, cluster.orchestrator, cluster.gateway):
            for batch in (
                [f for f in junk if len(f[0]) <= wire.MAX_FRAME_BYTES],
                [f for f in junk if len(f[0]) > wire.MAX_FRAME_BYTES],
            ):
                # An oversized message makes libzmq drop its connection, so it goes on a socket
                # of its own; linger lets everything queued leave before the socket closes.
                sock = cluster.dealer(ctx, address)  # an authenticated peer sending garbage
                sock.setsockopt(zmq.LINGER, 5000)
                for frames in batch:
                    sock.send_multipart(frames)
                sock.close()
            # and raw bytes that are not even ZMTP
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=2) as raw:
                raw.sendall(os.urandom(4096))
    finally:
        ctx.destroy(linger=0)
    with cluster.client() as client:
        assert client.ping().ready
        _, done = complete(client, prompt="The dog", max_tokens=8)
        assert isinstance(done, wire.Done)
    for name in ("registry", "orchestrator", "gateway"):
        assert cluster.procs[name].popen.poll() is None, cluster.procs[name].tail()
        # Garbage on one connection is not ordered with the ping on another: wait for the log.
        end = time.monotonic() + 10
        while not any(
            e.get("msg") == "dropped malformed frame" for e in cluster.procs[name].log_events()
        ):
            assert time.monotonic() < end, name
            time.sleep(0.02)


def test_a_client_that_goes_away_cancels_the_generation(cluster: Cluster) -> None:
    with cluster.client() as client:
        stream = client.stream(
            {"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}
        )
        first = next(stream)
        assert isinstance(first, wire.Chunk)
        stream.close()  # the client leaves mid-stream
        end = time.monotonic() + 10
        while True:
            stats = client.stats()
            if all(w.busy == 0 for w in stats.workers):
                break
            assert time.monotonic() < end, stats
            time.sleep(0.01)
    cancelled = [
        e
        for name in ("worker-1", "worker-2")
        for e in cluster.procs[name].log_events()
        if e.get("msg") == "cancelled"
    ]
    assert cancelled


def test_full_queue_is_refused_at_once_with_a_retry_hint(tmp_path: Path) -> None:
    small = Cluster(tmp_path, workers=1, queue_size=2)
    ctx = zmq.Context()
    try:
        sock = small.dealer(ctx, small.gateway)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        request = {"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}
        ids = [wire.new_id() for _ in range(6)]
        sent_at = time.monotonic()
        for request_id in ids:
            sock.send(wire.encode(wire.Infer(request=request), request_id, time.time() + 60))
        first: dict[str, tuple[wire.Msg, float]] = {}
        while sock.poll(1000, zmq.POLLIN):
            envelope = wire.decode(sock.recv())
            first.setdefault(envelope.id, (envelope.msg, time.monotonic() - sent_at))
            if sum(isinstance(m, wire.Error) for m, _ in first.values()) == 3:
                break
        refused = [(m, t) for m, t in first.values() if isinstance(m, wire.Error)]
        # one running, two queued, three refused
        assert len(refused) == 3, first
        for error, waited in refused:
            assert isinstance(error, wire.Error)
            assert error.code == "overloaded"
            assert error.retry_after is not None
            assert error.retry_after > 0
            assert waited < 1.0  # at once, not after waiting in line
        with small.client() as client:
            stats = client.stats()
        assert stats.queues == {"stories260K:1": 2}
        assert stats.counters["rejected_overloaded"] == 3

        # A flood of requests is answered at once (refused), and memory stays flat.
        def rss_kib(pid: int) -> int:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
            raise AssertionError("no VmRSS")

        pids = {n: small.procs[n].popen.pid for n in ("gateway", "orchestrator")}
        before = {n: rss_kib(p) for n, p in pids.items()}
        flood = [wire.new_id() for _ in range(3000)]
        for request_id in flood:
            sock.send(wire.encode(wire.Infer(request=request), request_id, time.time() + 60))
        answered: dict[str, str] = {}
        while len(answered) < len(flood) and sock.poll(5000, zmq.POLLIN):
            envelope = wire.decode(sock.recv())
            if envelope.id in flood and isinstance(envelope.msg, wire.Error):
                answered[envelope.id] = envelope.msg.code
        assert len(answered) == len(flood)
        assert set(answered.values()) <= {"overloaded", "rate_limited"}
        for name, pid in pids.items():
            grown = rss_kib(pid) - before[name]
            assert grown < 20 * 1024, f"{name} grew by {grown} KiB"
        for request_id in ids:
            sock.send(wire.encode(wire.Cancel(), request_id))
        sock.close()
    finally:
        ctx.destroy(linger=0)
        small.stop()


def test_gateway_logs_one_json_line_per_request(cluster: Cluster) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with cluster.client() as client:
        msgs = list(
            client.stream(
                {"prompt": "Once", "max_tokens": 3}, request_id="logged-1", traceparent=traceparent
            )
        )
    assert isinstance(msgs[-1], wire.Done)
    events = [e for e in cluster.procs["gateway"].log_events() if e.get("request_id") == "logged-1"]
    assert len(events) == 1
    event = events[0]
    assert event["msg"] == "request finished"
    assert event["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert event["outcome"] == "ok"
    assert event["daemon"] == "gateway"
    assert event["level"] == "info"
    assert event["tokens"] == 3
    assert isinstance(event["time"], float)
