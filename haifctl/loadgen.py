"""A load generator for OpenAI-compatible servers: the core of `haifctl bench`, with no rendering.

Requests are streamed `/v1/completions` calls with ``ignore_eos`` (so each yields exactly
``max_tokens``) and ``stream_options.include_usage``; every token count comes from the server's
``usage``, never from counting SSE events (a server may put several tokens in one event).  A level
keeps ``concurrency`` requests in flight until ``requests`` have finished (a closed loop), and
with several targets the batches alternate A, B, A, B ... so that both see the same machine.

    async with LoadGenerator([Target("http://127.0.0.1:8080")], Workload(128, 128)) as gen:
        await gen.calibrate()
        report = await gen.run([1, 8], requests_for=lambda c: 4 * c)
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

# Short, common words: most tokenisers give one token each; `calibrate` corrects for those that
# do not, from the prompt_tokens the server reports.
TEXT = (
    "the cat sat on a mat and the dog ran to the park where a bird sang in the old tree while "
    "children played near the small lake under a bright blue sky until the sun went down"
)
WORDS = tuple(TEXT.split())

MAX_ERROR_BODY = 4096  # bytes of a failed response kept for its message
MAX_PROMPT_WORDS = 1_000_000


def prompt_text(words: int, offset: int = 0) -> str:
    """Deterministic text of ``words`` words, its own for each ``offset``.

    The words are drawn from WORDS by a generator seeded with ``offset``, so two offsets' texts
    share a prefix of a word or two at most: a server's prompt cache cannot serve one
    request's prompt from another's, and every request pays for its prompt as a user's would.
    (Text that cycled through WORDS from ``offset`` came back every len(WORDS) requests.)
    """
    pick = random.Random(offset).choice
    return " ".join(pick(WORDS) for _ in range(max(1, words)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating linearly between ranks; None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Target:
    """One server: its base URL (without /v1) and the label reports use for it."""

    url: str
    label: str = "A"
    api_key: str | None = None


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    max_tokens: int
    model: str | None = None
    timeout: float = 300.0  # seconds, per request, from send to the end of its stream


@dataclass
class Result:
    """One request as the client saw it; times in seconds from sending it."""

    ok: bool = False
    error: str = ""
    status: int = 0
    latency: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    has_usage: bool = False

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (tokens - 1)."""
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


@dataclass
class Batch:
    """The requests of one level on one target, and the wall time they took together."""

    target: Target
    concurrency: int
    results: list[Result]
    wall: float


class Observer:
    """Progress hooks; the default does nothing.  Called on the event loop, so keep them quick."""

    def batch_started(self, target: Target, concurrency: int, requests: int) -> None:
        pass

    def request_done(self, target: Target, result: Result) -> None:
        pass


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(results: Sequence[Result], wall: float) -> dict[str, Any]:
    """One level on one target: rates over the wall time, latencies over successful requests."""
    good = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    completion = sum(r.completion_tokens for r in good)
    ttfts = [r.ttft for r in good if r.ttft is not None]
    tpots = [t for r in good if (t := r.tpot) is not None]
    itls = [gap for r in good for gap in r.itls]
    latencies = [r.latency for r in good]

    def pcts(values: Sequence[float]) -> dict[str, float | None]:
        return {
            "mean": _ms(sum(values) / len(values)) if values else None,
            "p50": _ms(percentile(values, 50)),
            "p99": _ms(percentile(values, 99)),
        }

    return {
        "requests": len(results),
        "ok": len(good),
        "errors": len(results) - len(good),
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "wall_s": round(wall, 4),
        "requests_per_s": round(len(good) / wall, 4) if wall > 0 else 0.0,
        "output_tokens_per_s": round(completion / wall, 2) if wall > 0 else 0.0,
        "completion_tokens": completion,
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in good) / len(good), 1)
        if good
        else None,
        "ttft_ms": pcts(ttfts),
        "tpot_ms": pcts(tpots),
        "itl_ms": pcts(itls),
        "latency_ms": pcts(latencies),
    }


# The figures `ratios` compares, as (name in the ratios, path in a summary).
RATIO_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("output_tokens_per_s", ("output_tokens_per_s",)),
    ("requests_per_s", ("requests_per_s",)),
    ("ttft_p50", ("ttft_ms", "p50")),
    ("ttft_p99", ("ttft_ms", "p99")),
    ("tpot_p50", ("tpot_ms", "p50")),
    ("itl_p50", ("itl_ms", "p50")),
)


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """A/B for each compared figure (None where B is zero or missing).

    Above 1 means A is faster for rates and slower for latencies.
    """
    out: dict[str, float | None] = {}
    for name, path in RATIO_FIELDS:
        x: Any = a
        y: Any = b
        for key in path:
            x = x.get(key) if isinstance(x, dict) else None
            y = y.get(key) if isinstance(y, dict) else None
        out[name] = round(x / y, 4) if x is not None and y else None
    return out


def merge(batches: Iterable[Batch]) -> tuple[list[Result], float]:
    """Rounds of the same level and target, as one: their results and their summed wall time."""
    results: list[Result] = []
    wall = 0.0
    for batch in batches:
        results.extend(batch.results)
        wall += batch.wall
    return results, wall


def _error_message(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return f"HTTP {status}: {error['message']}"
        if isinstance(error, str):
            return f"HTTP {status}: {error}"
        detail = data.get("detail") if isinstance(data, dict) else None
        if isinstance(detail, str):  # FastAPI's own errors, such as an unknown route
            return f"HTTP {status}: {detail}"
    except (ValueError, UnicodeDecodeError):
        pass
    return f"HTTP {status}"


class LoadGenerator:
    """Owns one HTTP client per target; use as ``async with``."""

    def __init__(
        self,
        targets: Sequence[Target],
        workload: Workload,
        *,
        max_concurrency: int = 1,
        observer: Observer | None = None,
    ) -> None:
        self.targets = list(targets)
        self.workload = workload
        self.observer = observer or Observer()
        self.words = workload.prompt_tokens  # corrected by calibrate()
        limits = httpx.Limits(
            max_connections=max_concurrency + 1, max_keepalive_connections=max_concurrency + 1
        )
        timeout = httpx.Timeout(workload.timeout, connect=min(10.0, workload.timeout))
        # trust_env off: measure the server named, not a proxy the environment happens to name
        self._clients = {
            t.label: httpx.AsyncClient(
                base_url=t.url, limits=limits, timeout=timeout, trust_env=False
            )
            for t in self.targets
        }

    async def __aenter__(self) -> LoadGenerator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def body(self, index: int, max_tokens: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt_text(self.words, index),
            "max_tokens": max_tokens or self.workload.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.workload.model:
            body["model"] = self.workload.model
        return body

    async def request(self, target: Target, index: int, max_tokens: int | None = None) -> Result:
        """One streamed completion, bounded by the workload's timeout; never raises for the
        server's faults (they become the result's error)."""
        result = Result()
        headers = {"Accept": "text/event-stream"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.workload.timeout):
                await self._stream(target, self.body(index, max_tokens), headers, start, result)
        except TimeoutError:
            result.error = f"timed out after {self.workload.timeout:g}s"
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (ValueError, TypeError) as exc:  # a usage object with non-numeric counts
            result.error = f"malformed response: {exc}"
        result.latency = time.perf_counter() - start
        if not result.error and not result.has_usage:
            result.error = "the stream carried no usage (stream_options.include_usage ignored?)"
        result.ok = not result.error
        return result

    async def _stream(
        self,
        target: Target,
        body: dict[str, Any],
        headers: dict[str, str],
        start: float,
        result: Result,
    ) -> None:
        client = self._clients[target.label]
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                data = b""
                async for piece in resp.aiter_bytes():
                    data += piece
                    if len(data) >= MAX_ERROR_BODY:
                        break
                result.error = _error_message(resp.status_code, data[:MAX_ERROR_BODY])
                return
            last: float | None = None
            async for line in resp.aiter_lines():
                # llama-server reports a failure mid-stream as an `error:` line, others as data
                field_name, _, value = line.partition(":")
                if field_name not in ("data", "error"):
                    continue
                value = value.strip()
                if value == "[DONE]":
                    break
                try:
                    event = json.loads(value)
                except ValueError:
                    result.error = "malformed SSE event"
                    return
                if not isinstance(event, dict):
                    continue
                if field_name == "error" or event.get("error"):
                    error = event.get("error", event)
                    message = error.get("message") if isinstance(error, dict) else error
                    result.error = f"error event: {message}"
                    return
                usage = event.get("usage")
                if isinstance(usage, dict):
                    result.has_usage = True
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.completion_tokens = int(usage.get("completion_tokens") or 0)
                choices = event.get("choices") or []
                if choices and isinstance(choices[0], dict) and choices[0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now

    async def calibrate(self) -> tuple[Target, Result]:
        """Warm up every target, and size the prompt so that the first target counts about
        ``prompt_tokens`` tokens in it (the words-per-token ratio is the server's to say).

        Returns the first target whose warm-up failed and its result, or the first target and
        its (successful) warm-up result.
        """
        head = self.targets[0]
        first = await self.request(head, 0)
        if first.ok and first.prompt_tokens > 0:
            wanted = self.workload.prompt_tokens
            if abs(first.prompt_tokens - wanted) > max(2, wanted // 10):
                self.words = max(
                    1, min(MAX_PROMPT_WORDS, round(self.words * wanted / first.prompt_tokens))
                )
                first = await self.request(head, 0)
        if not first.ok:
            return head, first
        for target in self.targets[1:]:
            other = await self.request(target, 0)
            if not other.ok:
                return target, other
        return head, first

    async def batch(self, target: Target, concurrency: int, requests: int, first: int = 1) -> Batch:
        """``requests`` requests with ``concurrency`` in flight at any time; their prompts are
        those of indices ``first``, ``first + 1`` ..."""
        self.observer.batch_started(target, concurrency, requests)
        results: list[Result] = []
        indices = iter(range(first, first + requests))

        async def worker() -> None:
            for index in indices:  # shared iterator: each index is taken once
                result = await self.request(target, index)
                results.append(result)
                self.observer.request_done(target, result)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, requests)):
                group.create_task(worker())
        return Batch(target, concurrency, results, time.perf_counter() - start)

    async def run(
        self,
        levels: Sequence[int],
        requests_for: Callable[[int], int],
        repeat: int = 1,
    ) -> list[dict[str, Any]]:
        """Every level on every target, interleaved per round; one summary per level."""
        report = []
        first = 1  # no prompt comes twice to one server (index 0 is the warm-up's)
        for concurrency in levels:
            n = requests_for(concurrency)
            batches: dict[str, list[Batch]] = {t.label: [] for t in self.targets}
            for _ in range(repeat):
                for target in self.targets:  # the same prompts for each server
                    batches[target.label].append(await self.batch(target, concurrency, n, first))
                first += n
            results = []
            for target in self.targets:
                summary = summarize(*merge(batches[target.label]))
                results.append({"endpoint": target.label, "url": target.url, **summary})
            level: dict[str, Any] = {
                "concurrency": concurrency,
                "requests": n * repeat,
                "results": results,
            }
            if len(results) == 2:
                level["ratios"] = ratios(results[0], results[1])
            report.append(level)
        return report
