"""The lean data plane: a worker sends one stream frame per engine step and destination, the
relays forward it as bytes, and a first token is never held back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from haifctl import wire
from haifctl.security import WORKER
from tests.cluster import Cluster

STREAMS = 4
TOKENS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("data-plane"), workers=1, slots=STREAMS)
    try:
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), codes


def stream(cluster: Cluster, seed: int, out: dict[int, list[wire.Msg]]) -> None:
    with cluster.client() as client:
        request = {"prompt": "Once upon a time", "max_tokens": TOKENS, "ignore_eos": True}
        out[seed] = list(client.stream({**request, "seed": seed}))


def test_concurrent_streams_share_frames_and_lose_nothing(cluster: Cluster) -> None:
    with cluster.client() as client:
        before = client.stats().counters.get("relayed_frames", 0)
    results: dict[int, list[wire.Msg]] = {}
    threads = [threading.Thread(target=stream, args=(cluster, i, results)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(STREAMS))
    chunks = 0
    for msgs in results.values():
        done = msgs[-1]
        assert isinstance(done, wire.Done), done
        assert done.completion_tokens == TOKENS
        body = [m for m in msgs[:-1] if isinstance(m, wire.Chunk)]
        assert len(body) == len(msgs) - 1
        assert sum(m.n_tokens for m in body) == TOKENS  # every token arrived, counted once
        chunks += len(body)
    with cluster.client() as client:
        frames = client.stats().counters["relayed_frames"] - before
    # Text is coalesced per stream, and the streams bound for one client share frames.
    assert chunks < STREAMS * TOKENS / 4
    assert frames <= chunks


def test_first_token_goes_out_alone_and_at_once(cluster: Cluster) -> None:
    with cluster.client() as client:
        msgs = list(client.stream({"prompt": "Once upon a time", "max_tokens": 200, "seed": 3}))
    first = msgs[0]
    assert isinstance(first, wire.Chunk)
    assert first.n_tokens == 1  # sent the step it was sampled, not after a coalescing window
    assert isinstance(msgs[-1], wire.Done)


def test_relays_forward_stream_frames_without_decoding_them(tmp_path: Path) -> None:
    """A worker's stream frame reaches the client byte for byte through the orchestrator and
    the gateway, routed by the identities the request carried; neither relay decodes it."""
    bare = Cluster(tmp_path, workers=0)
    ctx = zmq.Context()
    try:
        worker = bare.hand_made_worker(ctx, "hand-made")
        client = bare.dealer(ctx, bare.gateway)
        infer = bare.dispatched(client, worker, "r1")
        assert len(infer.route) == wire.ROUTE_FRAMES
        opaque = b"\xc1 not msgpack: the relays must not look inside"
        worker.send_multipart([*reversed(infer.route), opaque])
        assert client.poll(5000), "the stream frame never reached the client"
        assert client.recv() == opaque
        done = wire.Done(
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            model="stories260K:1",
            worker="hand-made",
            time_to_first_token_ms=1.0,
            generation_ms=2.0,
        )
        worker.send(wire.encode(done, "r1"))
        assert client.poll(5000)
        assert isinstance(wire.decode(client.recv()).msg, wire.Done)

        # An engine's link, named after its worker (identity NUL n), streams and ends for it;
        # one named after no worker is a stray.
        engine = bare.dealer(ctx, bare.orchestrator, WORKER, identity=b"hand-made\x001")
        stray = bare.dealer(ctx, bare.orchestrator, WORKER, identity=b"nobody\x001")
        infer = bare.dispatched(client, worker, "r3")
        with bare.client() as admin:
            strays = admin.stats().counters.get("stray_worker_messages", 0)
        stray.send_multipart([*reversed(infer.route), b"not from this worker"])
        engine.send_multipart([*reversed(infer.route), b"engine text"])
        assert client.poll(5000)
        assert client.recv() == b"engine text"  # only the engine's frame came through
        engine.send(wire.encode(done, "r3"))
        assert client.poll(5000)
        assert isinstance(wire.decode(client.recv()).msg, wire.Done)
        with bare.client() as admin:
            assert admin.stats().counters.get("stray_worker_messages", 0) == strays + 1

        # A Started note rides in the frame that carries a request's first text: once it has
        # gone through, losing the worker fails the request (worker_lost), never retries it.
        infer = bare.dispatched(client, worker, "r2")
        started = wire.encode(wire.Started(ids=["r2"]))
        worker.send_multipart([*reversed(infer.route), b"first text", started])
        assert client.poll(5000)
        assert client.recv() == b"first text"  # the note itself stays with the relays
        worker.close(linger=0)  # the worker goes silent: dropped after the heartbeat timeout
        assert client.poll(15_000), "the started request was never answered"
        error = wire.decode(client.recv()).msg
        assert isinstance(error, wire.Error)
        assert error.code == "worker_lost"
    finally:
        ctx.destroy(linger=0)
        bare.stop()
