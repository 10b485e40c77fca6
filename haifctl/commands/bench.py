"""`haifctl bench`: load an OpenAI-compatible server and report throughput and latency."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from haifctl import __version__
from haifctl.commands._shared import JsonFlag, print_json, state, stderr, stdout, want_json
from haifctl.errors import HaifError, InvalidInput, Kind, NotFound, Unavailable
from haifctl.loadgen import LoadGenerator, Observer, Result, Target, Workload

MAX_LEVEL = 4096
LABELS = ("A", "B")


def parse_levels(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; anything else is a usage error."""
    levels = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= MAX_LEVEL:
            raise typer.BadParameter(
                f"{part!r} is not a whole number from 1 to {MAX_LEVEL}; "
                "give a comma-separated list such as 1,8,32"
            )
        levels.append(int(part))
    return levels


def _levels_callback(value: str) -> str:
    parse_levels(value)
    return value


def normalize_url(text: str) -> str:
    """A server's base URL: scheme added when missing, a trailing /v1 or / dropped."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    if scheme not in ("http", "https") or not host or host.startswith(":"):
        raise InvalidInput(
            "bad_url",
            f"{text!r} is not an http:// or https:// URL",
            "give the server's base URL, for example http://127.0.0.1:8080",
        )
    url = url.rstrip("/")
    return url.removesuffix("/v1").rstrip("/")


def local_bridge(ctx: typer.Context) -> str:
    """The HTTP bridge of the local cluster, when one is up."""
    from haifctl.daemon.state import daemon_endpoint, running_state

    data = running_state(state(ctx).settings().home)
    endpoint = daemon_endpoint(data, "bridge") if data and data.get("state") == "ready" else ""
    if not endpoint:
        raise Unavailable(
            "not_running",
            "no URL given and no local cluster with an HTTP bridge is running",
            "give a server's URL (haifctl bench http://HOST:PORT) or start one with: haifctl up",
        )
    # a bridge listening on every interface is reached on loopback
    for wildcard in ("//0.0.0.0:", "//[::]:"):
        endpoint = endpoint.replace(wildcard, "//127.0.0.1:")
    return endpoint


# What a server's refusal of the warm-up request means for the exit code (README: "Errors").
STATUS_KINDS = {
    400: Kind.invalid,
    401: Kind.unauthorised,
    403: Kind.forbidden,
    404: Kind.not_found,
    413: Kind.invalid,
    422: Kind.invalid,
    429: Kind.overloaded,
    503: Kind.unavailable,
    504: Kind.timeout,
}


def warm_up_error(target: Target, result: Result) -> HaifError:
    where = f"{target.url}/v1/completions"
    if result.error.startswith("timed out"):
        return HaifError(
            "bench_timeout",
            f"the warm-up request to {where} {result.error}",
            "a first request can be slow while a model loads: raise --timeout",
            kind=Kind.timeout,
        )
    if result.status == 0:
        return Unavailable(
            "bench_unreachable",
            f"{target.url} does not answer ({result.error})",
            "check the URL and that the server is running (haifctl status for a local cluster)",
        )
    if result.status in (401, 403):
        return HaifError(
            "bench_unauthorized",
            f"{where} refused the request: {result.error}",
            "pass the server's key with --api-key KEY or HAIF_API_KEY",
            kind=STATUS_KINDS[result.status],
        )
    if result.status in (404, 405) and result.error in (
        f"HTTP {result.status}",
        f"HTTP {result.status}: Not Found",
        f"HTTP {result.status}: Method Not Allowed",
    ):
        return NotFound(
            "bench_not_openai",
            f"{where} does not exist ({result.error})",
            "give the base URL of an OpenAI-compatible server (it must serve /v1/completions)",
        )
    if result.status == 200 and "usage" in result.error:
        return InvalidInput(
            "bench_no_usage",
            f"{where} streamed no token usage",
            "the server must honour stream_options.include_usage; tokens are counted from usage",
        )
    kind = STATUS_KINDS.get(result.status)
    if kind is None:
        kind = Kind.unavailable if result.status >= 500 else Kind.invalid
    return HaifError(
        "bench_warm_up_failed",
        f"the warm-up request to {where} failed: {result.error}",
        "check --model (without it the server's default model is used; GET /v1/models lists "
        "them) and the server's logs",
        kind=kind,
    )


class _ProgressObserver(Observer):
    """One progress bar per batch (level x endpoint), on stderr; the finished ones disappear."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = progress.add_task("warming up", total=None, errors=0)
        self.errors = 0

    def batch_started(self, target: Target, concurrency: int, requests: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.errors = 0
        self.task = self.progress.add_task(
            f"{target.label} concurrency {concurrency}", total=requests, errors=0
        )

    def request_done(self, target: Target, result: Result) -> None:
        if self.task is None:
            return
        self.errors += 0 if result.ok else 1
        self.progress.update(self.task, advance=1, errors=self.errors)


async def _run(
    targets: list[Target],
    workload: Workload,
    levels: list[int],
    requests: int | None,
    repeat: int,
    progress: Progress | None,
) -> tuple[list[dict[str, Any]], int]:
    """The report per level, and the prompt's length in words after calibration."""
    observer = _ProgressObserver(progress) if progress is not None else None
    async with LoadGenerator(
        targets, workload, max_concurrency=max(levels), observer=observer
    ) as gen:
        target, warm = await gen.calibrate()
        if not warm.ok:
            raise warm_up_error(target, warm)
        report = await gen.run(levels, lambda c: requests or max(4 * c, 16), repeat=repeat)
        return report, gen.words


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(doc: dict[str, Any], console: Console) -> None:
    w = doc["workload"]
    console.print(
        f"[bold]haifctl bench[/bold]  {w['max_tokens']} output tokens per request "
        f"(end of text ignored), a prompt of about {w['prompt_tokens']} tokens; "
        "times in ms"
    )
    for endpoint in doc["endpoints"]:
        table = Table(
            title=f"{endpoint['label']}  {endpoint['url']}",
            title_justify="left",
            header_style="bold",
            box=None,
            pad_edge=False,
        )
        for column in (
            "CONC",
            "REQS",
            "REQ/S",
            "TOK/S",
            "PROMPT",
            "TTFT P50",
            "TTFT P99",
            "TPOT P50",
            "ITL P50",
            "ITL P99",
            "ERRORS",
        ):
            table.add_column(column, justify="right")
        for level in doc["levels"]:
            r = next(x for x in level["results"] if x["endpoint"] == endpoint["label"])
            table.add_row(
                str(level["concurrency"]),
                str(r["requests"]),
                f"{r['requests_per_s']:,.2f}",
                f"{r['output_tokens_per_s']:,.1f}",
                "-" if r["prompt_tokens_mean"] is None else f"{r['prompt_tokens_mean']:.0f}",
                _ms(r["ttft_ms"]["p50"]),
                _ms(r["ttft_ms"]["p99"]),
                _ms(r["tpot_ms"]["p50"]),
                _ms(r["itl_ms"]["p50"]),
                _ms(r["itl_ms"]["p99"]),
                str(r["errors"]),
            )
        console.print()
        console.print(table)
    if len(doc["endpoints"]) == 2:
        table = Table(
            title="A/B  (rates above 1: A is faster; latencies above 1: A is slower)",
            title_justify="left",
            header_style="bold",
            box=None,
            pad_edge=False,
        )
        for column in ("CONC", "TOK/S", "REQ/S", "TTFT P50", "TTFT P99", "TPOT P50", "ITL P50"):
            table.add_column(column, justify="right")
        for level in doc["levels"]:
            q = level["ratios"]
            table.add_row(
                str(level["concurrency"]),
                _ratio(q["output_tokens_per_s"]),
                _ratio(q["requests_per_s"]),
                _ratio(q["ttft_p50"]),
                _ratio(q["ttft_p99"]),
                _ratio(q["tpot_p50"]),
                _ratio(q["itl_p50"]),
            )
        console.print()
        console.print(table)


def _warn_errors(doc: dict[str, Any]) -> None:
    failed = total = 0
    kinds: dict[str, int] = {}
    for level in doc["levels"]:
        for r in level["results"]:
            failed += r["errors"]
            total += r["requests"]
            for kind, n in r["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
    if failed:
        common = max(kinds.items(), key=lambda kv: kv[1])[0]
        stderr().print(
            f"warning: {failed} of {total} requests failed; most often: {common}", markup=False
        )


def bench(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Argument(
            help="Base URL of an OpenAI-compatible server; default: the local cluster's bridge.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        str,
        typer.Option(
            "--concurrency",
            "-c",
            help="Levels of requests in flight, comma-separated.",
            callback=_levels_callback,
        ),
    ] = "1,8,32",
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests",
            "-r",
            min=1,
            max=1_000_000,
            help="Requests per level and endpoint (default: 4 x concurrency, at least 16).",
            show_default=False,
        ),
    ] = None,
    prompt_tokens: Annotated[
        int,
        typer.Option(
            "--prompt-tokens", "-p", min=1, max=131072, help="Prompt length, about, in tokens."
        ),
    ] = 128,
    max_tokens: Annotated[
        int,
        typer.Option("--max-tokens", "-n", min=1, max=131072, help="Tokens generated per request."),
    ] = 128,
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="A second server, run interleaved with the first; prints first/second ratios.",
            show_default=False,
        ),
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat", min=1, max=100, help="Rounds per level (with --against: A, B, A, B, ...)."
        ),
    ] = 1,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model name to request; default: the server's.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="HAIF_API_KEY",
            help="Sent as Authorization: Bearer KEY to both servers. [env: HAIF_API_KEY]",
            show_envvar=False,
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds allowed per request.")
    ] = 300.0,
    json: JsonFlag = False,
) -> None:
    """Measure a server under load: requests/s, output tokens/s, TTFT, TPOT, inter-token latency.

    Each level keeps CONCURRENCY streamed /v1/completions requests in flight until --requests
    have finished. Tokens are counted from the server's usage; end of text is ignored, so every
    request generates --max-tokens. Every request has a prompt of its own, never sent to a
    server twice, so no prompt cache serves one from another. One warm-up request per server
    comes first. With --against, both servers run each level in turn (A, B, A, B ... with
    --repeat) on the same prompts and the ratios A/B are printed. Without a URL it measures the
    local cluster's HTTP bridge (`haifctl up`); it works as well against llama-server or any
    other OpenAI-compatible server.

    Examples:

      haifctl bench -c 1,4,16

      haifctl bench http://127.0.0.1:8080 -c 1,8,32 -n 128 --json

      haifctl bench http://127.0.0.1:8080 --against http://127.0.0.1:8081 --repeat 2
    """
    want_json(ctx, json)
    levels = parse_levels(concurrency)
    first = normalize_url(url) if url else local_bridge(ctx)
    targets = [Target(first, "A", api_key)]
    if against:
        targets.append(Target(normalize_url(against), "B", api_key))
    workload = Workload(prompt_tokens, max_tokens, model, timeout)
    err = stderr()
    show_progress = not json and err.is_terminal
    progress = (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("errors {task.fields[errors]}"),
            console=err,
            transient=True,
        )
        if show_progress
        else None
    )
    with progress or contextlib.nullcontext():
        report, words = asyncio.run(_run(targets, workload, levels, requests, repeat, progress))
    doc = {
        "haifctl": __version__,
        "workload": {
            "prompt_tokens": prompt_tokens,
            "prompt_words": words,
            "max_tokens": max_tokens,
            "model": model,
            "repeat": repeat,
            "timeout_s": timeout,
        },
        "endpoints": [{"label": t.label, "url": t.url} for t in targets],
        "levels": report,
    }
    _warn_errors(doc)
    if json:
        print_json(doc)
    else:
        render(doc, stdout())
