"""`haifctl bench` as a user runs it, against a real cluster's HTTP bridge."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Run

TOKENS = 16


@pytest.fixture
def bridge(haifctl: Run) -> Iterator[str]:
    up = haifctl("up", "--workers", "1", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        info = json.loads(haifctl("status", "--json").stdout)
        yield next(d["endpoint"] for d in info["daemons"] if d["name"] == "bridge")
    finally:
        haifctl("down")


def check_level(result: dict, requests: int, prompt_tokens: int) -> None:
    assert result["requests"] == result["ok"] == requests, result
    assert result["errors"] == 0
    assert result["error_kinds"] == {}
    # every request generated exactly max_tokens (end of text ignored), counted from usage
    assert result["completion_tokens"] == requests * TOKENS
    assert result["output_tokens_per_s"] > 0
    assert result["requests_per_s"] > 0
    assert result["output_tokens_per_s"] == pytest.approx(
        result["requests_per_s"] * TOKENS, rel=0.01
    )
    # the prompt was sized from the server's own token count
    assert abs(result["prompt_tokens_mean"] - prompt_tokens) <= prompt_tokens * 0.25
    ttft, tpot, latency = result["ttft_ms"], result["tpot_ms"], result["latency_ms"]
    assert 0 < ttft["p50"] <= ttft["p99"]
    assert 0 <= tpot["p50"] <= tpot["p99"]
    assert ttft["p99"] <= latency["p99"]
    assert latency["p99"] <= result["wall_s"] * 1000


def test_bench_reports_consistent_figures(haifctl: Run, bridge: str) -> None:
    proc = haifctl(
        "bench", bridge, "--concurrency", "1,2", "--requests", "4", "--max-tokens", str(TOKENS),
        "--prompt-tokens", "48", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but the document on stdout
    assert doc["endpoints"] == [{"label": "A", "url": bridge}]
    assert doc["workload"]["max_tokens"] == TOKENS
    assert [level["concurrency"] for level in doc["levels"]] == [1, 2]
    for level in doc["levels"]:
        assert level["requests"] == 4
        assert "ratios" not in level
        [result] = level["results"]
        assert result["endpoint"] == "A"
        check_level(result, 4, 48)

    # the same server twice, interleaved: two result sets per level and their ratios
    proc = haifctl(
        "bench", bridge + "/v1", "--against", bridge, "-c", "2", "-r", "2", "-n", str(TOKENS),
        "-p", "48", "--repeat", "2", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [e["label"] for e in doc["endpoints"]] == ["A", "B"]
    [level] = doc["levels"]
    assert level["requests"] == 4
    for result in level["results"]:
        check_level(result, 4, 48)
    assert set(level["ratios"]) == {
        "output_tokens_per_s",
        "requests_per_s",
        "ttft_p50",
        "ttft_p99",
        "tpot_p50",
        "itl_p50",
    }
    for name in ("output_tokens_per_s", "requests_per_s", "ttft_p50", "tpot_p50"):
        assert level["ratios"][name] > 0

    # no URL: the local cluster's bridge; the table is for people
    proc = haifctl("bench", "-c", "1", "-r", "2", "-n", "4", "-p", "8", "--against", bridge)
    assert proc.returncode == 0, proc.stderr
    assert f"A  {bridge}" in proc.stdout
    assert "TTFT P50" in proc.stdout
    assert "A/B" in proc.stdout
    assert proc.stderr == ""  # no progress bars when stderr is not a terminal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_bench_reports_a_server_that_does_not_answer(haifctl: Run) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = haifctl("bench", url, "-c", "1", "-r", "1")
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"error: {url} does not answer")
    assert lines[1].startswith("hint: ")
    assert len(lines) == 2

    proc = haifctl("bench", url, "--json")
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["error"]["code"] == "bench_unreachable"


def test_bench_without_a_url_or_a_cluster(haifctl: Run) -> None:
    proc = haifctl("bench")
    assert proc.returncode == 3
    assert "no local cluster" in proc.stderr
    assert "hint: " in proc.stderr


@pytest.mark.parametrize("levels", ["1,x", "0", "", "1;8"])
def test_bench_refuses_a_bad_concurrency_list(haifctl: Run, levels: str) -> None:
    proc = haifctl("bench", "http://127.0.0.1:9", "--concurrency", levels)
    assert proc.returncode == 2
    assert "--concurrency" in proc.stderr


def test_bench_refuses_a_url_that_is_not_http(haifctl: Run) -> None:
    proc = haifctl("bench", "ftp://127.0.0.1:9")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 'ftp://127.0.0.1:9' is not an http")
