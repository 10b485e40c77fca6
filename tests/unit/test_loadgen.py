"""The load generator's arithmetic: percentiles, per-level summaries, ratios, and bench's inputs."""

from __future__ import annotations

import asyncio
import json

import pytest
import typer

from haifctl.commands.bench import normalize_url, parse_levels
from haifctl.errors import InvalidInput
from haifctl.loadgen import (
    Batch,
    LoadGenerator,
    Result,
    Target,
    Workload,
    merge,
    percentile,
    prompt_text,
    ratios,
    summarize,
)


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="outside"):
        percentile(values, 101)


def ok(ttft: float, latency: float, tokens: int, itls: list[float] | None = None) -> Result:
    return Result(
        ok=True,
        status=200,
        ttft=ttft,
        latency=latency,
        prompt_tokens=10,
        completion_tokens=tokens,
        itls=itls or [],
        has_usage=True,
    )


def test_summary_counts_tokens_from_usage_and_latencies_over_successes() -> None:
    results = [
        ok(0.1, 1.1, 11, [0.1] * 10),
        ok(0.3, 2.3, 11, [0.2] * 10),
        Result(error="HTTP 429: overloaded", status=429, latency=0.01),
        Result(error="HTTP 429: overloaded", status=429, latency=0.01),
        Result(error="ConnectError", latency=0.01),
    ]
    s = summarize(results, wall=2.0)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 2, 3)
    assert s["error_kinds"] == {"HTTP 429: overloaded": 2, "ConnectError": 1}
    assert s["completion_tokens"] == 22
    assert s["output_tokens_per_s"] == 11.0
    assert s["requests_per_s"] == 1.0
    assert s["prompt_tokens_mean"] == 10
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(298.0)
    # TPOT: (latency - ttft) / (tokens - 1) -> 100 ms and 200 ms
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0)
    assert s["itl_ms"]["p50"] == pytest.approx(150.0)
    assert s["latency_ms"]["p99"] == pytest.approx(2288.0)


def test_summary_of_nothing_but_failures_has_no_latencies() -> None:
    s = summarize([Result(error="timed out after 1s", latency=1.0)], wall=1.0)
    assert s["ok"] == 0
    assert s["output_tokens_per_s"] == 0
    assert s["prompt_tokens_mean"] is None
    assert s["ttft_ms"] == {"mean": None, "p50": None, "p99": None}


def test_one_token_has_no_time_per_output_token() -> None:
    assert ok(0.1, 0.1, 1).tpot is None
    assert ok(0.1, 0.5, 5).tpot == pytest.approx(0.1)


def test_rounds_merge_and_ratios_divide_a_by_b() -> None:
    t = Target("http://x")
    results, wall = merge(
        [Batch(t, 1, [ok(0.1, 1.0, 10)], 1.0), Batch(t, 1, [ok(0.1, 1.0, 10)], 1.5)]
    )
    assert (len(results), wall) == (2, 2.5)
    a = summarize(results, wall)
    b = summarize([ok(0.2, 1.0, 10), ok(0.2, 1.0, 10)], 5.0)
    q = ratios(a, b)
    assert q["output_tokens_per_s"] == pytest.approx(2.0)
    assert q["requests_per_s"] == pytest.approx(2.0)
    assert q["ttft_p50"] == pytest.approx(0.5)
    assert q["itl_p50"] is None  # neither side had two content events
    failed = summarize([Result(error="x")], 1.0)
    assert ratios(a, failed)["ttft_p50"] is None
    assert ratios(a, failed)["output_tokens_per_s"] is None


def test_prompts_are_deterministic_and_differ_per_request() -> None:
    assert prompt_text(5, 3) == prompt_text(5, 3)
    assert prompt_text(5, 3) != prompt_text(5, 4)
    assert len(prompt_text(40).split()) == 40
    assert prompt_text(0) != ""
    # no prompt comes back, nor shares more than a few words of prefix with another: a
    # server's prompt cache gets nothing from a benchmark's earlier requests
    texts = [prompt_text(128, i) for i in range(200)]
    assert len(set(texts)) == 200
    assert longest_shared_prefix(texts) <= 4


def longest_shared_prefix(texts: list[str]) -> int:
    """The most leading words any two of ``texts`` have in common."""
    words = [t.split() for t in texts]
    longest = 0
    for i, a in enumerate(words):
        for b in words[i + 1 :]:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            longest = max(longest, n)
    return longest


async def recording_server(prompts: list[str]) -> tuple[asyncio.Server, str]:
    """A stand-in OpenAI completions server on loopback: it notes each prompt and streams one
    event of text and one of usage (prompt_tokens: the prompt's words)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = json.loads(await reader.readexactly(length))
            prompts.append(body["prompt"])
            usage = {
                "prompt_tokens": len(body["prompt"].split()),
                "completion_tokens": body["max_tokens"],
            }
            events = (
                f"data: {json.dumps({'choices': [{'index': 0, 'text': ' x'}]})}\n\n"
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(events), events)
            )
            await writer.drain()
            if reader.at_eof():
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def test_no_server_sees_a_prompt_twice_and_both_see_the_same() -> None:
    """Across levels and rounds each request has a prompt of its own (a prompt seen before
    would be a cache hit for the server, not work), and A and B get the same prompts."""

    async def run() -> tuple[list[str], list[str]]:
        seen_a: list[str] = []
        seen_b: list[str] = []
        server_a, url_a = await recording_server(seen_a)
        server_b, url_b = await recording_server(seen_b)
        targets = [Target(url_a, "A"), Target(url_b, "B")]
        try:
            async with LoadGenerator(targets, Workload(prompt_tokens=32, max_tokens=4)) as gen:
                await gen.calibrate()
                report = await gen.run([1, 3], requests_for=lambda c: 4, repeat=2)
        finally:
            for server in (server_a, server_b):
                server.close()
                await server.wait_closed()
        for level in report:
            assert [r["ok"] for r in level["results"]] == [8, 8]
        return seen_a, seen_b

    seen_a, seen_b = asyncio.run(run())
    bench_a, bench_b = seen_a[1:], seen_b[1:]  # after the warm-up
    assert len(bench_a) == len(bench_b) == 16
    assert len(set(bench_a)) == 16
    assert sorted(bench_a) == sorted(bench_b)
    assert seen_a[0] not in bench_a
    assert longest_shared_prefix(bench_a) <= 4


def test_levels_and_urls() -> None:
    assert parse_levels("1, 8,32") == [1, 8, 32]
    for bad in ("", "1,,2", "0", "-1", "x", "1.5", "99999"):
        with pytest.raises(typer.BadParameter):
            parse_levels(bad)
    assert normalize_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normalize_url("http://h:1/v1/") == "http://h:1"
    assert normalize_url("https://h/api/") == "https://h/api"
    for bad in ("ftp://h", "http://", "http://:80"):
        with pytest.raises(InvalidInput):
            normalize_url(bad)
