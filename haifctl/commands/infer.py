"""`haifctl infer`: stream a completion."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from haifctl import wire
from haifctl.commands._dispatch import cluster_gateway, run_cluster, run_local
from haifctl.commands._shared import (
    GatewayOpt,
    GpuLayersOpt,
    LocalFlag,
    ModelOpt,
    NCtxOpt,
    ThreadsOpt,
    human_size,
    print_json,
    state,
    stderr,
    want_json,
)
from haifctl.errors import InvalidInput
from haifctl.schema import decode_request, validate_request

MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


def _read_payload(source: str) -> tuple[bytes, str]:
    if source == "-":
        data = sys.stdin.buffer.read(MAX_PAYLOAD_BYTES + 1)
        name = "stdin"
    else:
        path = Path(source).expanduser()
        name = str(path)
        try:
            if path.stat().st_size > MAX_PAYLOAD_BYTES:
                raise _too_big(name)
            data = path.read_bytes()
        except FileNotFoundError:
            raise InvalidInput(
                "payload_not_found",
                f"no such payload file: {path}",
                "check the path, or use --json - for stdin (--output json prints JSON)",
            ) from None
        except IsADirectoryError:
            raise InvalidInput("payload_unreadable", f"{path} is a directory") from None
        except OSError as exc:
            raise InvalidInput(
                "payload_unreadable", f"cannot read {path}: {exc.strerror}"
            ) from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise _too_big(name)
    return data, name


def _too_big(name: str) -> InvalidInput:
    return InvalidInput(
        "payload_too_large",
        f"{name} is over {MAX_PAYLOAD_BYTES // (1024 * 1024)} MiB",
        "prompts that large do not fit any model's context; shorten it",
    )


def check_json_flag(args: list[str]) -> None:
    """`infer "text" --json` with no FILE after it: --json means the request's input here, so
    say what was meant rather than click's "requires an argument"."""
    if "infer" not in args:
        return
    rest = args[args.index("infer") + 1 :]
    for i, arg in enumerate(rest):
        if arg == "--":
            return
        if arg == "--json":
            after = rest[i + 1] if i + 1 < len(rest) else None
            if after is None or (after.startswith("-") and after != "-"):
                raise InvalidInput(
                    "invalid_arguments",
                    "--json reads a request from a FILE, and none was given",
                    "for JSON output use --output json (-o json); for a request on stdin, --json -",
                )
            return


def loading_spinner(model: wire.ModelInfo) -> AbstractContextManager[object]:
    """A spinner naming the model and its size on stderr while it loads, so that tens of
    seconds of loading a large model do not look like a hang; only on a terminal (it goes
    before the first token, so piped output and logs never see it)."""
    err = stderr()
    if not err.is_terminal:
        return nullcontext()
    try:
        size = f" ({human_size(Path(model.path).stat().st_size)})"
    except OSError:
        size = ""
    return err.status(f"loading {model.ref}{size}", spinner="dots")


def infer(
    ctx: typer.Context,
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; '-' reads it from stdin.", show_default=False)
    ] = None,
    payload: Annotated[
        str | None,
        typer.Option(
            "--json",
            help="Read a JSON request from FILE ('-' for stdin): "
            '{"model", "prompt" | "messages", "max_tokens", "temperature", ...}. '
            "For JSON output, use --output json.",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens", "-n", min=1, help="Tokens to generate. [env: HAIF_MAX_TOKENS]"
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature", "-t", min=0.0, max=5.0, help="Sampling temperature; 0 is greedy."
        ),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", min=0, help="Sample among the K likeliest tokens (0: all)."),
    ] = None,
    min_p: Annotated[
        float | None,
        typer.Option(
            "--min-p", min=0.0, max=1.0, help="Drop tokens below this share of the likeliest."
        ),
    ] = None,
    repeat_penalty: Annotated[
        float | None,
        typer.Option(
            "--repeat-penalty", min=0.0, max=10.0, help="Penalty for repeated tokens (1: none)."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", min=0, max=2**31 - 1, help="Random seed, for repeatable output."),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop at this string (repeatable).", show_default=False),
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Generate all --max-tokens, past end-of-text.")
    ] = False,
    system: Annotated[
        str | None,
        typer.Option(
            "--system", help="System message: renders the prompt with the model's chat template."
        ),
    ] = None,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "--output", "-o", help="text: stream tokens; json: one object with usage and timings."
        ),
    ] = OutputFormat.text,
    n_ctx: NCtxOpt = None,
    n_gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    local: LocalFlag = False,
    gateway: GatewayOpt = None,
) -> None:
    """Stream a completion of PROMPT from a model.

    Goes through the cluster when one is up (`haifctl up`, or --gateway / GATEWAY_URL), and runs
    in-process otherwise; --local forces in-process. The output is the same either way.

    Examples:

      haifctl infer "Once upon a time"

      haifctl infer --json payload.json -o json

      echo "Tell me a story" | haifctl infer - --system "You are a storyteller."
    """
    as_json = want_json(ctx, output is OutputFormat.json)
    settings = state(ctx).settings(
        model=model,
        max_tokens=max_tokens,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        threads=threads,
        gateway_url=gateway,
    )

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repeat_penalty": repeat_penalty,
            "seed": seed,
            "stop": stop or None,
            "system": system,
            "ignore_eos": ignore_eos or None,
        }.items()
        if v is not None
    }
    if payload is not None:
        if prompt is not None:
            raise InvalidInput(
                "invalid_arguments",
                "give a PROMPT or --json, not both",
                "put the prompt in the payload",
            )
        data, source = _read_payload(payload)
        request = decode_request(data, source)
        if overrides:
            request = msgspec.structs.replace(request, **overrides)
    else:
        if prompt is None:
            raise InvalidInput(
                "missing_prompt",
                "no prompt given",
                'haifctl infer "Once upon a time", or --json FILE, or - to read stdin',
            )
        if prompt == "-":
            prompt = sys.stdin.read(MAX_PAYLOAD_BYTES + 1)
            if len(prompt) > MAX_PAYLOAD_BYTES:
                raise _too_big("stdin")
        request = validate_request({"prompt": prompt, **overrides})

    stream = request.stream and not as_json
    out = sys.stdout

    def show(text: str) -> None:
        if stream and text:
            out.write(text)
            out.flush()

    address = None if local else cluster_gateway(settings)
    if address is not None:
        result = run_cluster(address, settings, request, show)
    else:
        result = run_local(settings, request, show, loading_spinner)
    if result.finish_reason == "cancelled" and not as_json:
        stderr().print("\n[dim]stopped[/dim]")

    if as_json:
        print_json(msgspec.to_builtins(result))
    else:
        if not stream:
            out.write(result.text)
        out.write("\n")
        out.flush()
        err = stderr()
        if err.is_terminal:
            t = result.timings
            ttft = (
                f"{t.time_to_first_token_ms:.1f} ms"
                if t.time_to_first_token_ms is not None
                else "-"
            )
            err.print(
                f"[dim]{result.model} · {result.worker or result.served_by} · "
                f"{result.usage.completion_tokens} tokens · "
                f"{t.tokens_per_second:.0f} tok/s · first token {ttft} · "
                f"{result.finish_reason}[/dim]"
            )
    if result.finish_reason == "cancelled":
        raise typer.Exit(130)
