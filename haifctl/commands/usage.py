"""`haifctl usage`: what each API key (or model) used, from the registry database."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec
import typer
from rich.table import Table

from haifctl.commands._dispatch import open_cli_registry
from haifctl.commands._shared import JsonFlag, print_json, state, stdout, want_json
from haifctl.registry.usage import parse_since


class By(StrEnum):
    key = "key"
    model = "model"


def usage(
    ctx: typer.Context,
    since: Annotated[
        str,
        typer.Option(
            "--since", help="How far back: 30m, 1h, 7d, 2w (a bare number is seconds), or all."
        ),
    ] = "24h",
    by: Annotated[
        By | None,
        typer.Option("--by", help="One line per API key id or per model (default: one total)."),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Requests, tokens and latency of finished requests, summed per key or model.

    The gateways record every request that ends (its key id, model, worker, prompt and
    completion tokens, time to first token, duration, outcome) in the registry database;
    rows older than usage_retention_days are pruned.

    Examples:

      haifctl usage --by key

      haifctl usage --since 1d --by model --json
    """
    want_json(ctx, json)
    since_s = parse_since(since)
    settings = state(ctx).settings()
    with open_cli_registry(settings) as registry:
        totals = registry.usage(since_s, by.value if by else None)
    if json:
        print_json(
            {"since": since, "by": by.value if by else None, "totals": msgspec.to_builtins(totals)}
        )
        return
    out = stdout()
    if not totals:
        out.print(
            f"no finished requests recorded in the last {since}"
            if since_s
            else "no finished requests recorded"
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    first = {"key": "KEY", "model": "MODEL"}.get(by.value if by else "", "")
    for column in (
        first,
        "REQUESTS",
        "ERRORS",
        "PROMPT TOK",
        "COMPLETION TOK",
        "TTFT MS",
        "DURATION MS",
    ):
        if column:
            table.add_column(column, justify="left" if column == first else "right")
    for t in totals:
        cells = [
            str(t.requests),
            str(t.errors),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            "-" if t.avg_ttft_ms is None else f"{t.avg_ttft_ms:.1f}",
            f"{t.avg_duration_ms:.1f}",
        ]
        table.add_row(*([t.name] if first else []), *cells)
    out.print(table)
