"""Per-request usage in the registry database, on SQLite and Postgres alike: the gateway
records every request that ends, in batches; `haifctl usage` sums them; old rows are pruned."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from haifctl import wire
from haifctl.registry.service import open_registry
from haifctl.registry.usage import UsageRow
from haifctl.security import ADMIN, BRIDGE, GATEWAY
from haifctl.telemetry import Metrics
from haifctl.usage import UsageRecorder
from tests.cluster import HAIFCTL, Cluster

OPEN: list[zmq.Socket[bytes]] = []


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    while OPEN:
        OPEN.pop().close(linger=0)
    context.destroy(linger=0)


def row(i: int, *, key: str = "key_a", ago_s: float = 0.0, outcome: str = "ok") -> UsageRow:
    return UsageRow(
        id=f"test-{i}",
        finished_at=time.time() - ago_s,
        request_id=f"req-{i}",
        key_id=key,
        model="stories260K:1",
        worker="worker-1",
        prompt_tokens=3,
        completion_tokens=7,
        ttft_ms=2.5,
        duration_ms=10.0,
        outcome=outcome,
    )


def test_usage_rows_are_stored_once_summed_and_pruned(registry_url: str) -> None:
    with open_registry(registry_url) as registry:
        rows = [row(i, key="key_a" if i % 3 else "key_b", ago_s=i * 60.0) for i in range(900)]
        rows.append(row(900, key="key_b", outcome="deadline_exceeded"))
        assert registry.record_usage(rows) == 901  # more than one INSERT's worth
        assert registry.record_usage(rows[:50]) == 0  # a batch sent twice is stored once
        [total] = registry.usage()
        assert (total.name, total.requests, total.errors) == ("all", 901, 1)
        assert (total.prompt_tokens, total.completion_tokens) == (2703, 6307)
        assert total.avg_ttft_ms == 2.5
        by_key = {t.name: t for t in registry.usage(None, "key")}
        assert {k: t.requests for k, t in by_key.items()} == {"key_a": 600, "key_b": 301}
        assert [t.name for t in registry.usage(None, "model")] == ["stories260K:1"]
        # the last hour: rows 0..59 (one a minute), plus the error that just happened
        assert registry.usage(3600 - 30)[0].requests == 61
        assert registry.prune_usage(3600 - 30) == 840
        assert registry.usage()[0].requests == 61
        assert registry.usage(None, "key")[0].name == "key_a"


def test_no_usage_sums_to_nothing(registry_url: str) -> None:
    with open_registry(registry_url) as registry:
        assert registry.usage() == []
        assert registry.usage(3600, "model") == []


def usage_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAIFCTL, "usage", *args],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_usage(
    cluster: Cluster, requests: int, timeout: float = 30.0
) -> dict[str, dict[str, object]]:
    """Probe `haifctl usage --by key --json` until it counts ``requests`` in all."""
    end = time.monotonic() + timeout
    while True:
        result = usage_cli(cluster, "--by", "key", "--json")
        assert result.returncode == 0, result.stderr
        totals = {t["name"]: t for t in json.loads(result.stdout)["totals"]}
        if sum(int(t["requests"]) for t in totals.values()) >= requests:
            return totals
        assert time.monotonic() < end, f"usage never reached {requests}: {totals}"
        time.sleep(0.1)  # polling the probe


def infer(sock: zmq.Socket[bytes], key: str, request: dict[str, object]) -> wire.Msg:
    request_id = wire.new_id()
    sock.send(wire.encode(wire.Infer(request=request, client=key), request_id, time.time() + 60))
    while True:
        assert sock.poll(60_000)
        envelope = wire.decode(sock.recv())
        if envelope.id == request_id and isinstance(envelope.msg, wire.Done | wire.Error):
            return envelope.msg


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_url: str
) -> Iterator[Cluster]:
    """A cluster whose registry (and so its usage) lives on each backend in turn."""
    monkeypatch.setenv("HAIF_REGISTRY_URL", registry_url)
    cluster = Cluster(tmp_path, workers=1)
    yield cluster
    cluster.stop()


def test_every_finished_request_is_recorded(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sock = cluster.dealer(ctx, cluster.gateway, BRIDGE)
    OPEN.append(sock)
    for _ in range(3):
        assert isinstance(infer(sock, "key_a", {"prompt": "Once", "max_tokens": 4}), wire.Done)
    done = infer(sock, "key_b", {"prompt": "Once upon", "max_tokens": 5})
    assert isinstance(done, wire.Done)
    missing = infer(sock, "key_b", {"prompt": "Once", "model": "no-such-model"})
    assert isinstance(missing, wire.Error)
    totals = wait_usage(cluster, 5)
    assert totals["key_a"]["requests"] == 3
    assert totals["key_a"]["errors"] == 0
    assert totals["key_a"]["completion_tokens"] == 12
    assert totals["key_b"]["requests"] == 2
    assert totals["key_b"]["errors"] == 1
    assert totals["key_b"]["prompt_tokens"] == done.prompt_tokens
    assert totals["key_a"]["avg_ttft_ms"] is not None
    by_model = json.loads(usage_cli(cluster, "--by", "model", "--json").stdout)["totals"]
    assert {t["name"]: t["requests"] for t in by_model} == {"stories260K:1": 4, "no-such-model": 1}
    table = usage_cli(cluster, "--since", "1h", "--by", "key")
    assert table.returncode == 0
    assert "key_a" in table.stdout
    assert "COMPLETION TOK" in table.stdout
    with open_registry(str(cluster.env["HAIF_REGISTRY_URL"])) as registry:
        rows = registry.backend.query("SELECT * FROM request_usage ORDER BY finished_at")
    assert [r["outcome"] for r in rows] == ["ok"] * 4 + ["model_not_found"]
    assert {r["worker"] for r in rows[:4]} == {"worker-1"}
    assert all(r["request_id"] and r["duration_ms"] > 0 for r in rows)
    assert rows[3]["prompt_tokens"] == done.prompt_tokens


def test_a_stalled_registry_loses_no_usage(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """While the registry is stopped, requests go on (the model is known) and their rows wait
    in the gateway; once it answers again, every row arrives and none was dropped."""
    sock = cluster.dealer(ctx, cluster.gateway, BRIDGE)
    OPEN.append(sock)
    assert isinstance(infer(sock, "key_a", {"prompt": "Once", "max_tokens": 2}), wire.Done)
    wait_usage(cluster, 1)
    registry = cluster.procs["registry"]
    registry.kill(signal.SIGSTOP)
    try:
        for _ in range(30):
            assert isinstance(infer(sock, "key_a", {"prompt": "Once", "max_tokens": 2}), wire.Done)
    finally:
        registry.kill(signal.SIGCONT)
    totals = wait_usage(cluster, 31)
    assert totals["key_a"]["requests"] == 31
    metrics = gateway_metrics(cluster)
    assert "haif_usage_dropped_rows_total 0.0" in metrics
    assert "haif_usage_recorded_rows_total 31.0" in metrics


def gateway_metrics(cluster: Cluster) -> str:
    import httpx

    endpoints = cluster.procs["gateway"].wait_ready()["endpoints"]
    assert isinstance(endpoints, dict)
    return httpx.get(str(endpoints["metrics"]), timeout=5).text


def test_old_usage_is_pruned_as_new_arrives(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_url: str,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with open_registry(registry_url) as registry:
        registry.record_usage([row(1, ago_s=3 * 86400), row(2, ago_s=0.5 * 86400)])
    monkeypatch.setenv("HAIF_REGISTRY_URL", registry_url)
    monkeypatch.setenv("HAIF_USAGE_RETENTION_DAYS", "1")
    cluster = Cluster(tmp_path, workers=1)
    try:
        sock = cluster.dealer(ctx, cluster.gateway, BRIDGE)
        OPEN.append(sock)
        assert isinstance(infer(sock, "key_new", {"prompt": "Once", "max_tokens": 2}), wire.Done)
        end = time.monotonic() + 30
        while True:
            with open_registry(registry_url) as registry:
                ids = {r["id"] for r in registry.backend.query("SELECT id FROM request_usage")}
            if "test-1" not in ids:  # three days old: past the retention of one
                break
            assert time.monotonic() < end, ids
            time.sleep(0.1)  # polling the database
        assert "test-2" in ids  # half a day old: kept
        assert len(ids) == 2  # and the new request's row
    finally:
        cluster.stop()


def test_a_gateway_may_only_record_usage_at_the_registry(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    gateway = cluster.dealer(ctx, cluster.registry, GATEWAY)
    admin = cluster.dealer(ctx, cluster.registry, ADMIN)
    OPEN.extend([gateway, admin])

    def ask(sock: zmq.Socket[bytes], call: wire.RegistryCall) -> wire.Msg:
        sock.send(wire.encode(call, "q"))
        assert sock.poll(10_000)
        return wire.decode(sock.recv()).msg

    rows = [row_fields(row(7))]
    stored = ask(gateway, wire.RegistryCall(op="record_usage", args={"rows": rows}))
    assert isinstance(stored, wire.RegistryReply)
    assert stored.result == 1
    for op in ("list", "usage", "remove"):
        refused = ask(gateway, wire.RegistryCall(op=op, args={"ref": "stories260K"}))
        assert isinstance(refused, wire.Error)
        assert refused.code == "forbidden"
    garbage = ask(gateway, wire.RegistryCall(op="record_usage", args={"rows": [["x"]]}))
    assert isinstance(garbage, wire.Error)
    assert garbage.kind == "invalid"
    totals = ask(admin, wire.RegistryCall(op="usage", args={"by": "key"}))
    assert isinstance(totals, wire.RegistryReply)
    assert [t["name"] for t in totals.result] == ["key_a"]


def row_fields(r: UsageRow) -> list[object]:
    return [getattr(r, f) for f in UsageRow.__struct_fields__]


def test_the_buffer_holds_then_drops_and_counts(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """A registry that does not answer: rows wait (up to the bound), the batch goes again when
    its answer is overdue, and rows past the bound are dropped and counted."""
    registry = ctx.socket(zmq.ROUTER)
    OPEN.append(registry)
    port = registry.bind_to_random_port("tcp://127.0.0.1")
    sock = ctx.socket(zmq.DEALER)
    OPEN.append(sock)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(f"tcp://127.0.0.1:{port}")
    metrics = Metrics("gateway")
    recorder = UsageRecorder(
        sock, metrics, max_rows=5, batch_rows=3, flush_s=0.0, ack_timeout_s=0.2
    )
    for i in range(3):
        recorder.add(f"r{i}", "key", "m", "w", 1, 2, 0.5, 3.0, "ok")
    end = time.monotonic() + 10
    while not registry.poll(10):  # the connection is up once a batch gets through
        assert time.monotonic() < end
        recorder.tick(time.monotonic())
    identity, body = registry.recv_multipart()
    first = wire.decode(body)
    assert isinstance(first.msg, wire.RegistryCall)
    assert [r[2] for r in first.msg.args["rows"]] == ["r0", "r1", "r2"]
    for i in range(3, 12):  # 5 wait, 4 more are dropped
        recorder.add(f"r{i}", "key", "m", "w", 1, 2, None, 3.0, "ok")
    assert recorder.dropped == 4
    assert recorder.pending == 8
    assert metrics.registry.get_sample_value("haif_usage_dropped_rows_total") == 4
    # no answer: the same batch again, once overdue
    end = time.monotonic() + 10
    while not registry.poll(10):
        assert time.monotonic() < end
        recorder.tick(time.monotonic())
    again = wire.decode(registry.recv_multipart()[1])
    assert again.id == first.id
    registry.send_multipart([identity, wire.encode(wire.RegistryReply(result=3), first.id)])
    end = time.monotonic() + 10
    while recorder.recorded < 3:
        assert time.monotonic() < end
        if sock.poll(10):
            recorder.read(wire.decode)
    recorder.tick(time.monotonic())  # the next batch goes at once
    assert registry.poll(5000)
    second = wire.decode(registry.recv_multipart()[1])
    assert isinstance(second.msg, wire.RegistryCall)
    assert [r[2] for r in second.msg.args["rows"]] == ["r3", "r4", "r5"]


def test_usage_cli_refuses_a_bad_duration(tmp_path: Path) -> None:
    result = subprocess.run(
        [HAIFCTL, "usage", "--since", "soon"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "error: --since 'soon' is not a duration" in result.stderr
    empty = subprocess.run([HAIFCTL, "usage"], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 0
    assert "no finished requests recorded in the last 24h" in empty.stdout
