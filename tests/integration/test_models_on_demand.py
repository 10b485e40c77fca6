"""Models on demand with real workers: loads, eviction under a memory cap, keep-alive, routing
by context length, labels, and what `haifctl ps` shows.

Every model here is the shipped one, registered under other names (a copy of the file, or the
same file under another name), so each load takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from haifctl import wire
from haifctl.registry.service import builtin_model_path, open_registry
from haifctl.security import BRIDGE
from tests.cluster import HAIFCTL, Cluster, Proc

T = TypeVar("T")
MIB = 1 << 20


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Probe until it answers something truthy (a readiness wait with a deadline)."""
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(0.02)  # the probe's polling interval


def register(cluster: Cluster, name: str, copy: bool = True, **params: object) -> str:
    """Register the shipped model (a copy of its file, so each has its own path) as ``name``."""
    path = builtin_model_path()
    if copy:
        path = Path(shutil.copy(path, cluster.workdir / f"{name}.gguf"))
    with open_registry(f"sqlite:///{cluster.workdir / 'home' / 'registry.db'}") as registry:
        return registry.register(path, name=name, params=params or None).ref


def status_of(cluster: Cluster, ref: str) -> str:
    with open_registry(f"sqlite:///{cluster.workdir / 'home' / 'registry.db'}") as registry:
        return registry.resolve(ref).status


def worker(cluster: Cluster, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    """A worker with flags (and environment) of its own, joined and ready."""
    proc = Proc(
        name,
        [
            "worker",
            "--orchestrator",
            cluster.orchestrator,
            "--worker-id",
            name,
            "--heartbeat",
            "0.2",
            *args,
        ],
        cluster.workdir,
        {**cluster.env, **(env or {})},
    )
    cluster.procs[name] = proc
    proc.wait_ready()
    return proc


def table(cluster: Cluster) -> dict[str, wire.WorkerState]:
    with cluster.client() as client:
        return {w.worker_id: w for w in client.stats().workers}


def loaded(cluster: Cluster, worker_id: str) -> dict[str, wire.ModelState]:
    w = table(cluster).get(worker_id)
    return {m.ref: m for m in w.loaded} if w is not None else {}


def ask(cluster: Cluster, **request: object) -> wire.Done | wire.Error:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "seed": 1, **request}
    with cluster.client() as client:
        for msg in client.stream(body, timeout=60.0):
            if isinstance(msg, wire.Done | wire.Error):
                return msg
    raise AssertionError("the stream ended without an answer")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, workers=0)
    try:
        yield c
    finally:
        c.stop()


def test_a_request_for_an_unloaded_model_loads_it_and_succeeds(cluster: Cluster) -> None:
    worker(cluster, "w1")
    other = register(cluster, "other")
    assert set(loaded(cluster, "w1")) == {"stories260K:1"}
    done = ask(cluster, model="other")
    assert isinstance(done, wire.Done), done
    assert (done.model, done.worker) == (other, "w1")
    models = loaded(cluster, "w1")
    assert set(models) == {"stories260K:1", other}
    state = models[other]
    size = builtin_model_path().stat().st_size
    assert state.weights_bytes == size
    assert state.kv_bytes > 0
    assert state.size_bytes == size + state.kv_bytes
    assert state.n_ctx == 2048
    assert state.slots == 1
    assert state.served == 1
    w = table(cluster)["w1"]
    assert w.memory_budget > 0
    assert w.memory_used == sum(m.size_bytes for m in w.loaded)
    # the registry's deployment status follows
    wait_for(lambda: status_of(cluster, other) == "deployed", "other:1 deployed", 10)
    events = cluster.procs["orchestrator"].log_events()
    assert any(e["msg"] == "request waits for a load" for e in events)
    placed = [e for e in events if e["msg"] == "loading a model"]
    assert placed
    assert placed[0]["worker"] == "w1"
    assert "spread" in str(placed[0]["placement"])
    # a second request for it finds it loaded: no second load
    assert isinstance(ask(cluster, model="other"), wire.Done)
    assert sum(e["msg"] == "loading a model" for e in events) == 1


def test_concurrent_requests_share_one_load_and_other_models_keep_flowing(
    cluster: Cluster,
) -> None:
    worker(cluster, "w1", "--slots", "4")
    other = register(cluster, "other")
    models = ["other", "other", "other", "stories260K"]
    with ThreadPoolExecutor(len(models)) as pool:  # each with a client (a connection) of its own
        answers = list(pool.map(lambda m: ask(cluster, model=m), models))
    assert [a.model for a in answers if isinstance(a, wire.Done)] == [other] * 3 + [
        "stories260K:1"
    ], answers
    events = cluster.procs["orchestrator"].log_events()
    assert sum(e["msg"] == "loading a model" for e in events) == 1


def test_a_memory_cap_evicts_the_idle_model_and_never_a_busy_one(cluster: Cluster) -> None:
    # room for one copy of the model (about 4.9 MiB: its KV cache of f32 keys, and the prefill
    # context's), not two
    worker(cluster, "w1", "--memory", "6M")
    second = register(cluster, "second")
    third = register(cluster, "third")
    done = ask(cluster, model="second")
    assert isinstance(done, wire.Done), done
    assert set(loaded(cluster, "w1")) == {second}  # the idle stories260K made room
    events = cluster.procs["orchestrator"].log_events()
    evicted = [e for e in events if e["msg"] == "unloading a model"]
    assert evicted[0]["model"] == "stories260K:1"
    assert "evicted" in evicted[0]["why"]
    # second busy (a long stream held open): third cannot evict it, and says why
    with cluster.client() as client:
        stream = client.stream(
            {"prompt": "Once", "model": "second", "max_tokens": 2000, "ignore_eos": True},
            timeout=60,
        )
        first = next(stream)
        assert isinstance(first, wire.Chunk)
        refused = ask(cluster, model="third")
        rest = list(stream)
    assert isinstance(refused, wire.Error), refused
    assert refused.code == "no_room"
    assert "needs" in refused.message
    assert "MiB" in refused.message  # the memory needed and the most available
    assert isinstance(rest[-1], wire.Done)
    assert rest[-1].model == second
    assert set(loaded(cluster, "w1")) == {second}
    # idle again: now third evicts it
    assert isinstance(ask(cluster, model="third"), wire.Done)
    assert set(loaded(cluster, "w1")) == {third}


def test_keep_alive_unloads_on_time(cluster: Cluster) -> None:
    worker(cluster, "w1", "--keep-alive", "1s")
    quick, brief, kept = (
        register(cluster, "quick"),
        register(cluster, "brief"),
        register(cluster, "kept"),
    )
    # keep_alive 0: unloaded right after the request
    assert isinstance(ask(cluster, model="quick", keep_alive=0), wire.Done)
    wait_for(lambda: quick not in loaded(cluster, "w1"), "quick unloaded", 10)
    # the worker's --keep-alive (1 s): not before, and soon after
    assert isinstance(ask(cluster, model="brief"), wire.Done)
    finished = time.monotonic()
    wait_for(lambda: status_of(cluster, brief) == "deployed", "brief deployed", 0.8)
    left = loaded(cluster, "w1")[brief].keep_alive_left_s
    assert left is not None
    assert 0 < left <= 1.0
    wait_for(lambda: brief not in loaded(cluster, "w1"), "brief unloaded", 10)
    assert time.monotonic() - finished >= 0.8
    # the registry's deployment status follows it back
    wait_for(lambda: status_of(cluster, brief) == "registered", "brief registered", 10)
    # -1 keeps it; a request's "2s" form is read as Ollama's
    assert isinstance(ask(cluster, model="kept", keep_alive=-1), wire.Done)
    assert loaded(cluster, "w1")[kept].keep_alive_left_s is None
    assert isinstance(ask(cluster, model="stories260K", keep_alive="30s"), wire.Done)
    left = loaded(cluster, "w1")["stories260K:1"].keep_alive_left_s
    assert left is not None
    assert 25 < left <= 30
    assert kept in loaded(cluster, "w1")
    refused = ask(cluster, model="kept", keep_alive="soon")
    assert isinstance(refused, wire.Error)
    assert "keep_alive" in refused.message


def test_a_model_that_fails_to_load_fails_its_requests_once(cluster: Cluster) -> None:
    worker(cluster, "w1")
    broken = register(cluster, "broken")
    (cluster.workdir / "broken.gguf").write_bytes(b"GGUF not really")  # checksum mismatch now
    first = ask(cluster, model="broken")
    assert isinstance(first, wire.Error), first
    assert first.code == "checksum_mismatch"
    assert broken in first.message
    again = ask(cluster, model="broken")  # remembered: not loaded again in a loop
    assert isinstance(again, wire.Error)
    assert again.code == "checksum_mismatch"
    events = cluster.procs["orchestrator"].log_events()
    assert sum(e["msg"] == "loading a model" for e in events) == 1
    assert isinstance(ask(cluster, model="stories260K"), wire.Done)  # the worker is fine


def test_a_too_long_prompt_goes_to_the_worker_with_the_larger_context(cluster: Cluster) -> None:
    worker(cluster, "small", env={"HAIF_N_CTX": "128"})
    worker(cluster, "large", env={"HAIF_N_CTX": "2048"})
    assert loaded(cluster, "small")["stories260K:1"].n_ctx == 128
    prompt = "Once upon a time there was a little dog. " * 20  # about 200 tokens
    for _ in range(4):
        done = ask(cluster, prompt=prompt, max_tokens=16)
        assert isinstance(done, wire.Done), done
        assert done.worker == "large"
        assert done.prompt_tokens > 128
    short = [ask(cluster, max_tokens=4) for _ in range(6)]
    assert "small" in {d.worker for d in short if isinstance(d, wire.Done)}  # short: anywhere
    # longer than any context: a 400 naming the largest
    refused = ask(cluster, prompt=prompt * 12, max_tokens=16)
    assert isinstance(refused, wire.Error), refused
    assert refused.code in ("context_too_small", "prompt_too_long")
    assert "2048" in refused.message


def test_labels_pin_a_load_and_ps_shows_it(cluster: Cluster) -> None:
    worker(cluster, "cpu-box")
    worker(cluster, "gpu-box", "--label", "gpu=h100")
    pinned = register(cluster, "pinned", labels={"gpu": "h100"})
    done = ask(cluster, model="pinned")
    assert isinstance(done, wire.Done)
    assert done.worker == "gpu-box"
    refused = ask(cluster, model="stories260K", labels={"gpu": "a100"})
    assert isinstance(refused, wire.Error)
    assert "gpu=a100" in refused.message
    # labels no worker carries are the request's to change (400), and the hint says which exist
    assert (refused.kind, refused.code) == ("invalid", "no_matching_workers")
    assert "gpu=h100" in refused.hint
    env = {**cluster.env}
    out = subprocess.run(
        [HAIFCTL, "ps", "--gateway", cluster.gateway, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=30,
    )
    rows = json.loads(out.stdout)
    by = {(r["worker"], r["model"]): r for r in rows}
    row = by[("gpu-box", pinned)]
    assert row["served"] == 1
    assert row["slots"] == 1
    assert row["busy"] == 0
    assert row["context"] == 2048
    assert row["size_bytes"] > MIB
    assert row["labels"] == {"gpu": "h100"}
    assert ("cpu-box", "stories260K:1") in by
    text = subprocess.run(
        [HAIFCTL, "ps", "--gateway", cluster.gateway],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=30,
    ).stdout
    assert "pinned:1" in text
    assert "gpu-box" in text
    assert "KEEP-ALIVE" in text


def test_a_too_long_prompt_loads_the_model_with_a_larger_context(cluster: Cluster) -> None:
    other = register(cluster, "other")
    worker(cluster, "small", env={"HAIF_N_CTX": "128"})
    worker(cluster, "spare", "--model", other)  # has room, and not the model asked for
    prompt = "Once upon a time there was a little dog. " * 20  # about 200 tokens
    done = ask(cluster, model="stories260K", prompt=prompt, max_tokens=16)
    assert isinstance(done, wire.Done), done
    assert done.worker == "spare"
    state = loaded(cluster, "spare")["stories260K:1"]
    assert 128 < state.n_ctx <= 2048  # loaded with the context the request needed
    assert done.prompt_tokens + 16 <= state.n_ctx
    events = cluster.procs["orchestrator"].log_events()
    refits = [e for e in events if e["msg"] == "context too small; routing again"]
    assert refits
    assert refits[0]["to"] == "a load with a larger context"


def test_the_placement_decision_is_a_span_of_the_request_that_waited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTLP to a receiver in this test: the orchestrator's `placement` span names the worker,
    the policy and the reason, inside the request's trace; its queue wait says it waited."""
    spans: list[Any] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest.FromString(body)
            with lock:
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    cluster = Cluster(tmp_path, workers=0)
    try:
        worker(cluster, "w1")
        register(cluster, "other")
        assert isinstance(ask(cluster, model="other"), wire.Done)

        def exported() -> dict[str, Any] | None:
            with lock:
                named = {s.name: s for s in spans}
            wanted = {"placement", "queue wait", "orchestrator request"}
            return named if wanted <= set(named) else None

        named = wait_for(exported, "the placement span exported", 30)
    finally:
        cluster.stop()
        server.shutdown()
        server.server_close()

    def attributes(span: Any) -> dict[str, object]:
        return {a.key: a.value.string_value or a.value.double_value for a in span.attributes}

    placement, request = named["placement"], named["orchestrator request"]
    assert placement.trace_id == request.trace_id
    assert placement.parent_span_id == request.span_id
    facts = attributes(placement)
    assert facts["haif.model"] == "other:1"
    assert facts["haif.worker"] == "w1"
    assert facts["haif.placement"] == "spread"
    assert "least loaded" in str(facts["haif.reason"])
    assert attributes(named["queue wait"])["haif.waits_for_load"] == "other:1"


@pytest.mark.parametrize(("policy", "chosen"), [("spread", "roomy"), ("binpack", "snug")])
def test_the_placement_policy_chooses_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, chosen: str
) -> None:
    monkeypatch.setenv("HAIF_PLACEMENT", policy)  # the orchestrator's setting
    cluster = Cluster(tmp_path, workers=0)
    try:
        worker(cluster, "roomy", "--memory", "64M")
        worker(cluster, "snug", "--memory", "12M")
        register(cluster, "other")
        done = ask(cluster, model="other")
        assert isinstance(done, wire.Done), done
        assert done.worker == chosen
        events = cluster.procs["orchestrator"].log_events()
        placed = next(e for e in events if e["msg"] == "loading a model")
        assert str(placed["placement"]).startswith(policy)
    finally:
        cluster.stop()


def listed(cluster: Cluster) -> dict[str, wire.ModelEntry]:
    """The gateway's model list (what /v1/models shows), by NAME:VERSION."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = cluster.dealer(ctx, cluster.gateway, BRIDGE)  # as the bridge asks it
    try:
        sock.send(wire.encode(wire.ListModels(), wire.new_id()))
        assert sock.poll(10_000), "the gateway did not answer"
        answer = wire.decode(sock.recv()).msg
        assert isinstance(answer, wire.ModelList), answer
        return {m.ref: m for m in answer.models}
    finally:
        sock.close(linger=0)
        ctx.term()


def test_the_model_list_says_which_unloaded_models_a_worker_would_load(cluster: Cluster) -> None:
    worker(cluster, "snug", "--memory", "6M")  # one copy of the model at a time
    spare = register(cluster, "spare")
    models = wait_for(lambda: listed(cluster) if table(cluster) else None, "a worker joined")
    assert models["stories260K:1"].workers == 1
    assert not models["stories260K:1"].loadable  # it is loaded: nothing to say
    assert models[spare].workers == 0
    assert models[spare].loadable  # the worker would load it (evicting the idle one)
    with open_registry(f"sqlite:///{cluster.workdir / 'home' / 'registry.db'}") as registry:
        registry.set_status(spare, "retired")
    assert not listed(cluster)[spare].loadable
    with open_registry(f"sqlite:///{cluster.workdir / 'home' / 'registry.db'}") as registry:
        registry.set_status(spare, "registered")
    assert isinstance(ask(cluster, model="spare"), wire.Done)  # and it does load
    assert listed(cluster)[spare].workers == 1


def test_a_memory_share_is_a_part_of_what_is_free(cluster: Cluster) -> None:
    """`--memory 25%` (what `haifctl up` gives each of four workers on a machine): the budget
    is a quarter of the memory free when the worker starts, not all of it."""
    worker(cluster, "quarter", "--memory", "25%")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = table(cluster)["quarter"].memory_budget
    assert 0 < budget <= total // 4
