"""The HTTP bridge against a live cluster: the official OpenAI SDK, curl-level HTTP, errors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster import Cluster

KEY = "haif-test-key-0123456789"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("bridge")
    c = Cluster(workdir, workers=2, bridge_env={"HAIF_API_KEYS": KEY})
    try:
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.bridge}/v1", api_key=KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_completions(client: openai.OpenAI) -> None:
    done = client.completions.create(
        model="stories260K", prompt="Once upon a time", max_tokens=24, seed=5
    )
    assert done.object == "text_completion"
    assert done.model == "stories260K"  # the name asked for, as the streamed chunks say
    assert len(done.choices[0].text.split()) > 3
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage is not None
    assert done.usage.prompt_tokens == 5
    streamed = client.completions.create(
        model="stories260K", prompt="Once upon a time", max_tokens=24, seed=5, stream=True
    )
    pieces = [c.choices[0].text for c in streamed if c.choices]
    assert len(pieces) > 1
    assert "".join(pieces) == done.choices[0].text  # same seed, same text, streamed or not


def test_openai_chat_completions(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Tell stories."},
        {"role": "user", "content": "A story about a cat"},
    ]
    done = client.chat.completions.create(
        model="stories260K", messages=messages, max_tokens=20, seed=2
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content
    stream = client.chat.completions.create(
        model="stories260K",
        messages=messages,
        max_tokens=20,
        seed=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text) == done.choices[0].message.content
    assert usage is not None
    assert usage.completion_tokens == done.usage.completion_tokens


def test_openai_models_and_errors(client: openai.OpenAI, cluster: Cluster) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "stories260K:1" in ids
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    wrong = openai.OpenAI(base_url=f"{cluster.bridge}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="stories260K", prompt="x", max_tokens=2, n=17)
    assert info.value.body["param"] == "n"  # type: ignore[index]


def test_infer_plain_and_sse(cluster: Cluster) -> None:
    body = {"prompt": "Once upon a time", "params": {"max_tokens": 16, "seed": 4}}
    plain = httpx.post(f"{cluster.bridge}/infer", json=body, headers=auth(), timeout=30)
    assert plain.status_code == 200
    result = plain.json()
    assert set(result) >= {"id", "model", "output", "usage", "worker", "timings"}
    assert result["usage"]["completion_tokens"] == 16
    events = []
    with httpx.stream(
        "POST", f"{cluster.bridge}/infer", json={**body, "stream": True}, headers=auth(), timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    assert events[-1][0] == "done"
    tokens = [e for k, e in events if k == "token"]
    assert "".join(t["text"] for t in tokens) == result["output"] == events[-1][1]["output"]


def test_health_routes_stay_open(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.bridge}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{cluster.bridge}/readyz")
    assert ready.status_code == 200
    assert ready.json()["workers"] == 2
    assert httpx.get(f"{cluster.bridge}/openapi.json").json()["info"]["title"] == "haifctl bridge"
    assert httpx.get(f"{cluster.bridge}/docs").status_code == 200
    assert "haifctl" in httpx.get(f"{cluster.bridge}/").text


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, None, 400, "invalid_request"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400, "invalid_request"),
        ("/v1/chat/completions", {"messages": []}, None, 400, "invalid_request"),
        ("/infer", {"prompt": "x", "params": {"max_tokens": 100000}}, None, 400, "invalid_request"),
        ("/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer nope"}, 401, "unauthorized"),
        ("/v1/completions", {"prompt": "x"}, {}, 401, "unauthorized"),
        ("/v1/completions", {"model": "ghost", "prompt": "x"}, None, 404, "model_not_found"),
        ("/v1/completions", {"model": "ghost:", "prompt": "x"}, None, 400, "invalid_model_ref"),
        ("/infer", {"prompt": "x" * 300_000}, None, 413, "prompt_too_large"),
    ],
)
def test_error_statuses(
    cluster: Cluster, path: str, body: dict, headers: dict | None, status: int, code: str
) -> None:
    response = httpx.post(
        f"{cluster.bridge}{path}",
        json=body,
        headers=auth() if headers is None else headers,
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert len(response.content) < 2048  # error bodies stay small


def test_oversized_body_is_413(cluster: Cluster) -> None:
    response = httpx.post(
        f"{cluster.bridge}/infer",
        content=b"{" + b" " * (5 * 1024 * 1024),
        headers={**auth(), "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_client_disconnect_frees_the_worker(cluster: Cluster) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 1900, "stream": True}
    with httpx.stream(
        "POST", f"{cluster.bridge}/v1/completions", json=body, headers=auth(), timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    with cluster.client() as client:
        end = time.monotonic() + 10
        while any(w.busy for w in client.stats().workers):
            assert time.monotonic() < end
            time.sleep(0.01)
    cancelled = [
        e
        for name in ("worker-1", "worker-2")
        for e in cluster.procs[name].log_events()
        if e.get("msg") == "cancelled"
    ]
    assert cancelled


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One worker, a queue of 3, a 0.2 s deadline and a rate limit of 3 requests per second."""
    workdir = tmp_path_factory.mktemp("tight")
    os.environ["HAIF_REQUEST_TIMEOUT"] = "0.2"
    try:
        c = Cluster(
            workdir,
            workers=1,
            queue_size=3,
            gateway_args=("--rate", "3", "--burst", "6"),
            bridge_env={},
        )
    finally:
        os.environ.pop("HAIF_REQUEST_TIMEOUT")
    yield c
    c.stop()


def test_429_with_retry_after_and_504(tight: Cluster) -> None:
    import threading

    long = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    results: list[httpx.Response] = []

    def post(body: dict) -> None:
        results.append(
            httpx.post(
                f"{tight.bridge}/infer",
                json={"prompt": body["prompt"], "params": {"max_tokens": 2000}},
                timeout=30,
            )
        )

    threads = [threading.Thread(target=post, args=(long,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    # 1 runs, 3 wait in the queue past their 0.2 s deadline (504), the rest are refused (429)
    assert 429 in statuses
    assert 504 in statuses
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] in ("overloaded", "rate_limited")
        if r.status_code == 504:
            assert r.json()["error"]["code"] == "deadline_exceeded"
    # the rate limit: a burst of quick requests beyond 6 gets 429 rate_limited (sent at once,
    # so that no refill between them depends on how fast the others are answered)
    codes: list[httpx.Response] = []
    burst = [
        threading.Thread(
            target=lambda: codes.append(
                httpx.post(
                    f"{tight.bridge}/infer",
                    json={"prompt": "x", "params": {"max_tokens": 1}},
                    timeout=30,
                )
            )
        )
        for _ in range(10)
    ]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    limited = [r for r in codes if r.status_code == 429]
    assert limited
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert "Retry-After" in limited[0].headers


def test_503_when_no_worker_serves(tmp_path: Path) -> None:
    empty = Cluster(tmp_path, workers=0, bridge_env={})
    try:
        assert httpx.get(f"{empty.bridge}/readyz").status_code == 503
        response = httpx.post(f"{empty.bridge}/v1/completions", json={"prompt": "x"}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        empty.stop()


def test_503_when_the_registry_is_down(tmp_path: Path) -> None:
    empty = Cluster(tmp_path, workers=0, bridge_env={})
    try:
        empty.procs["registry"].kill()
        empty.procs["registry"].popen.wait(30)
        body = {"model": "never-resolved", "prompt": "x"}
        response = httpx.post(f"{empty.bridge}/v1/completions", json=body, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "registry_unreachable"
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        empty.stop()


def test_fuzzing_from_the_openapi_document_finds_no_server_errors(
    cluster: Cluster, tmp_path: Path
) -> None:
    import subprocess
    import sys

    schemathesis = str(Path(sys.executable).parent / "schemathesis")
    proc = subprocess.run(
        [
            schemathesis,
            "run",
            f"{cluster.bridge}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "20",
            "--generation-deterministic",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout
    # and the cluster still serves
    after = httpx.post(
        f"{cluster.bridge}/infer",
        json={"prompt": "Once", "params": {"max_tokens": 4}},
        headers=auth(),
        timeout=30,
    )
    assert after.status_code == 200
