"""The HTTP bridge's edge against real daemons: keys off loopback, body limits, client input
that must never be a 500, and slow or greedy clients (raw sockets to 127.0.0.1)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from haifctl.daemon.bridge import MAX_BODY_BYTES
from haifctl.keys import KeyStore
from tests.cluster import Cluster, Proc

KEY = "haif-edge-test-key-0123456789"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("edge")
    c = Cluster(workdir, workers=1, bridge_env={"HAIF_API_KEYS": KEY})
    try:
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), codes


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_bridge(cluster: Cluster, name: str, bind: str, env: dict[str, str]) -> tuple[Proc, str]:
    """Another bridge on the cluster's gateway, with settings of its own; its URL on loopback
    (a bridge bound to every interface is only ever reached there)."""
    base = {k: v for k, v in cluster.env.items() if k != "HAIF_API_KEYS"}
    proc = Proc(
        name,
        ["daemon", "bridge", "--gateway", cluster.gateway, "--bind", bind],
        cluster.workdir,
        {**base, **env},
    )
    cluster.procs[name] = proc
    port = urlsplit(proc.endpoint()).port
    return proc, f"http://127.0.0.1:{port}"


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response off a raw socket: status, headers, body (read to its length or EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return status, headers, body


def closed_by_peer(sock: socket.socket) -> bytes:
    """Everything the bridge sends until it closes the connection."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS, error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error


# --- 7: keys off loopback -------------------------------------------------------------------


def test_no_keys_off_loopback_refuses_every_protected_route(cluster: Cluster) -> None:
    # the cluster's home (the bridge's link keys live there too), its keys in keys.json only
    store = KeyStore(Path(cluster.env["HAIF_HOME"]), env="")
    key, _ = store.create("only")
    proc, url = start_bridge(cluster, "bridge-public", "0.0.0.0:0", {})
    try:
        assert httpx.get(f"{url}/v1/models", headers=auth(key), timeout=30).status_code == 200
        store.revoke("only")  # the last key, while the bridge runs on every interface
        routes = [
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
            ("POST", "/infer", {"prompt": "x"}),
        ]
        for method, path, body in routes:
            for headers in ({}, auth(key), auth("made-up")):
                response = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
                assert_openai_error(response, 503, "no_api_keys")
                assert "haifctl keys create" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        ready = httpx.get(f"{url}/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["auth"] == "locked"
        assert "haifctl keys create" in ready.json()["detail"]
        assert any(e.get("msg") == "no API keys: refusing every request" for e in proc.log_events())
    finally:
        proc.stop()


# --- 8: bodies ------------------------------------------------------------------------------


def test_a_chunked_body_is_refused_as_it_passes_the_limit(cluster: Cluster) -> None:
    with socket.create_connection(address(cluster.bridge), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 65536
        for _ in range(MAX_BODY_BYTES // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"1\r\n \r\n")  # one byte over; the body never ends (no last chunk)
        status, headers, body = read_response(sock)
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_the_key_is_checked_before_the_body_is_read(cluster: Cluster) -> None:
    with socket.create_connection(address(cluster.bridge), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500000\r\n\r\n{"  # no key, and a body that is not coming
        )
        status, _, body = read_response(sock)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "unauthorized"


def _many_messages() -> bytes:
    """A body under the limit whose request is over a frame once encoded for the gateway (each
    message takes 16 bytes in compact JSON, 20 in msgpack)."""
    count = (MAX_BODY_BYTES - 64) // len(b'{"role":"user"},')
    body = {"messages": [{"role": "user"}] * count, "max_tokens": 1}
    encoded = json.dumps(body, separators=(",", ":")).encode()
    assert len(encoded) <= MAX_BODY_BYTES
    return encoded


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/infer", lambda: json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()),
        ("/v1/chat/completions", _many_messages),
    ],
    ids=["2MiB-body", "over-a-frame-once-encoded"],
)
def test_a_request_over_a_frame_is_413_and_others_carry_on(
    cluster: Cluster, path: str, body: object
) -> None:
    assert callable(body)
    streamed = {"prompt": "Once upon a time", "max_tokens": 1900, "stream": True}
    with httpx.stream(
        "POST", f"{cluster.bridge}/v1/completions", json=streamed, headers=auth(), timeout=60
    ) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        big = httpx.post(
            cluster.bridge + path,
            content=body(),
            headers={**auth(), "Content-Type": "application/json"},
            timeout=60,
        )
        rest = [line for line in lines if line.startswith("data: ")]
    assert_openai_error(big, 413, "body_too_large")
    assert rest[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in rest)
    after = httpx.post(
        f"{cluster.bridge}/infer",
        json={"prompt": "Once", "params": {"max_tokens": 4}},
        headers=auth(),
        timeout=30,
    )
    assert after.status_code == 200, after.text


def test_waiting_requests_fail_fast_when_the_gateway_link_drops(tmp_path: Path) -> None:
    # a long heartbeat timeout: the stopped worker keeps its request the whole test
    c = Cluster(tmp_path, workers=1, heartbeat_timeout=60, bridge_env={})
    worker = c.procs["worker-1"]
    try:
        worker.kill(signal.SIGSTOP)
        result: list[httpx.Response | Exception] = []

        def post() -> None:
            try:
                body = {"prompt": "Once", "max_tokens": 4}
                result.append(httpx.post(f"{c.bridge}/v1/completions", json=body, timeout=60))
            except Exception as exc:  # reported by the assertion below
                result.append(exc)

        thread = threading.Thread(target=post)
        thread.start()
        with c.client() as client:  # probe: the request is on the worker, past the gateway
            end = time.monotonic() + 30
            while not any(w.busy for w in client.stats().workers):
                assert time.monotonic() < end, "the request never reached the worker"
                time.sleep(0.01)
        c.procs["gateway"].kill()
        thread.join(90)
        assert result, "the request hung after the gateway link dropped"
        response = result[0]
        assert isinstance(response, httpx.Response), response
        assert_openai_error(response, 503, "gateway_link_lost")
    finally:
        worker.kill(signal.SIGCONT)
        c.stop()


# --- 10: no 500 from client input -----------------------------------------------------------

BIG = 2**64  # msgpack, the wire's encoding, holds nothing over 2**64 - 1
LONE = "\ud800"  # json.dumps writes it as the escape "\\ud800"
ONE = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": BIG}),
        ("POST", "/v1/completions", {"prompt": "x", "top_k": BIG}),
        ("POST", "/v1/chat/completions", {"messages": ONE, "max_tokens": BIG}),
        ("POST", "/v1/chat/completions", {"messages": ONE, "max_completion_tokens": BIG}),
        ("POST", "/infer", {"prompt": "x", "params": {"max_tokens": BIG}}),
        ("POST", "/infer", {"prompt": "x", "params": {"top_k": BIG}}),
        ("POST", "/v1/completions", {"prompt": LONE}),
        ("POST", "/v1/completions", {"prompt": ["a" + LONE]}),
        ("POST", "/v1/completions", {"prompt": "x", "model": LONE}),
        ("POST", "/v1/completions", {"prompt": "x", "stop": LONE}),
        ("POST", "/v1/completions", {"prompt": "x", "stop": ["ok", "\udfff"]}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
        ),
        ("POST", "/infer", {"prompt": LONE}),
        ("POST", "/infer", {"messages": [{"role": "user", "content": LONE}]}),
        ("POST", "/infer", {"prompt": "x", "params": {"stop": [LONE]}}),
        ("POST", "/v1/completions", {"prompt": "x", "model": ":"}),
        ("POST", "/v1/completions", {"prompt": "x", "model": "name:"}),
        ("POST", "/v1/completions", {"prompt": "x", "model": ":1"}),
        ("POST", "/v1/completions", {"prompt": "x", "model": "   "}),
        ("POST", "/infer", {"prompt": "x", "model": ":"}),
        ("GET", "/no/such/route", None),
        ("POST", "/v1/no-such-route", {}),
        ("DELETE", "/v1/completions", None),
        ("GET", "/v1/chat/completions", None),
        ("PUT", "/healthz", None),
    ],
)
def test_client_mistakes_are_4xx_in_the_openai_shape(
    cluster: Cluster, method: str, path: str, body: object
) -> None:
    response = httpx.request(
        method,
        cluster.bridge + path,
        content=None if body is None else json.dumps(body),
        headers={**auth(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    assert_openai_error(response, response.status_code)


# --- 11: slow and greedy clients ------------------------------------------------------------


@pytest.fixture
def impatient(cluster: Cluster) -> Iterator[str]:
    """A bridge that gives a request head and each piece of a body one second."""
    env = {"HAIF_BRIDGE_HEADER_TIMEOUT": "1", "HAIF_BRIDGE_IDLE_TIMEOUT": "1"}
    proc, url = start_bridge(cluster, "bridge-impatient", "127.0.0.1:0", env)
    try:
        yield url
    finally:
        proc.stop()


def test_a_stalled_request_head_is_closed(impatient: str) -> None:
    for sent in (b"POST /infer HTTP/1.1\r\nHost: bridge\r\nContent-Ty", b""):
        with socket.create_connection(address(impatient), timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(sent)
            answer = closed_by_peer(sock)  # a socket timeout here: the bridge held it
            assert time.monotonic() - started < 20
            if sent:
                assert answer.startswith(b"HTTP/1.1 408"), answer


def test_a_stalled_body_is_408(impatient: str) -> None:
    with socket.create_connection(address(impatient), timeout=30) as sock:
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        status, _, body = read_response(sock)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "body_timeout"


def test_connections_per_client_address_are_capped(cluster: Cluster) -> None:
    env = {
        "HAIF_BRIDGE_MAX_CLIENT_CONNECTIONS": "3",
        "HAIF_BRIDGE_HEADER_TIMEOUT": "120",
        "HAIF_BRIDGE_IDLE_TIMEOUT": "120",
    }
    proc, url = start_bridge(cluster, "bridge-capped", "127.0.0.1:0", env)
    held: list[socket.socket] = []
    request = b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n"
    try:
        for _ in range(3):  # each served, so counted, and kept open (keep-alive)
            sock = socket.create_connection(address(url), timeout=30)
            held.append(sock)
            sock.sendall(request)
            assert read_response(sock)[0] == 200
        with socket.create_connection(address(url), timeout=30) as extra:
            answer = closed_by_peer(extra)
        assert answer.startswith(b"HTTP/1.1 429"), answer
        assert b"too_many_connections" in answer
        held.pop().close()
        # once the bridge has seen one close, a new connection is served (probe until then)
        end = time.monotonic() + 30
        while True:
            with socket.create_connection(address(url), timeout=30) as again:
                again.sendall(request)
                try:
                    if read_response(again)[0] == 200:
                        break
                except ConnectionError:
                    pass
            assert time.monotonic() < end
            time.sleep(0.01)
    finally:
        for sock in held:
            sock.close()
        proc.stop()
