"""`haifctl ps`: the models each worker has loaded, as `ollama ps` shows them."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from haifctl import security, wire
from haifctl.client import ClusterClient
from haifctl.commands._shared import JsonFlag, print_json, state, stdout, want_json
from haifctl.daemon.state import daemon_endpoint, running_state
from haifctl.errors import Unavailable
from haifctl.placement import human_bytes


def rows(workers: list[wire.WorkerState]) -> list[dict[str, Any]]:
    """One row per model per worker (a load on its way too), workers in name order."""
    out: list[dict[str, Any]] = []
    for w in sorted(workers, key=lambda w: w.worker_id):
        common = {
            "worker": w.worker_id,
            "device": w.device,
            "gpu_name": w.gpu_name,
            "gpu_memory_mb": w.gpu_memory_mb,
            "labels": w.labels,
            "memory_budget": w.memory_budget,
            "memory_used": w.memory_used,
        }
        for m in sorted(w.loaded, key=lambda m: m.ref):
            out.append(
                {
                    **common,
                    "model": m.ref,
                    "state": "loaded",
                    "size_bytes": m.size_bytes,
                    "weights_bytes": m.weights_bytes,
                    "kv_bytes": m.kv_bytes,
                    "n_gpu_layers": m.n_gpu_layers,
                    "n_layers": m.n_layers,
                    "busy": m.busy,
                    "slots": m.slots,
                    "context": m.n_ctx,
                    "keep_alive_left_s": m.keep_alive_left_s,
                    "idle_s": m.idle_s,
                    "served": m.served,
                }
            )
        for ref in w.loading:
            out.append({**common, "model": ref, "state": "loading"})
        if not w.loaded and not w.loading:  # an older worker: what it says it serves
            out.extend({**common, "model": ref, "state": "loaded"} for ref in w.models)
    return out


def keep_alive_left(seconds: float | None) -> str:
    if seconds is None:
        return "forever"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def processor(row: dict[str, Any]) -> str:
    """Where the layers run: all on the CPU, all on the GPU, or how many of them offloaded."""
    layers, total = row.get("n_gpu_layers", 0), row.get("n_layers", 0)
    if not layers:
        return "100% CPU"
    if layers >= total:
        return "100% GPU"
    return f"{layers}/{total} layers GPU"


def render(table_rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in (
        "WORKER",
        "MODEL",
        "SIZE",
        "PROCESSOR",
        "SLOTS",
        "CONTEXT",
        "KEEP-ALIVE",
        "SERVED",
    ):
        table.add_column(column)
    for r in table_rows:
        if r["state"] == "loading" or "size_bytes" not in r:
            table.add_row(r["worker"], r["model"], "-", "-", "-", "-", r["state"], "-")
            continue
        table.add_row(
            r["worker"],
            r["model"],
            human_bytes(r["size_bytes"]),
            processor(r),
            f"{r['busy']}/{r['slots']}",
            str(r["context"]),
            keep_alive_left(r["keep_alive_left_s"]),
            str(r["served"]),
        )
    return table


def ps(
    ctx: typer.Context,
    json: JsonFlag = False,
    gateway: Annotated[
        str | None,
        typer.Option("--gateway", help="A gateway to ask instead of the local cluster's."),
    ] = None,
) -> None:
    """Show the models each worker has loaded.

    For each: its size in memory, CPU/GPU split, slots busy of total, context, keep-alive left
    and requests served.

    Examples:

      haifctl ps

      haifctl ps --json | jq '.[] | select(.busy > 0)'
    """
    want_json(ctx, json)
    home = state(ctx).settings().home
    address = gateway
    if address is None:
        data = running_state(home)
        address = daemon_endpoint(data, "gateway") if data else ""
    if not address:
        raise Unavailable("not_running", "no cluster is running", "start one with: haifctl up")
    with ClusterClient(address, security.local(home)) as client:
        stats = client.stats(timeout=2.0)
    found = rows(stats.workers)
    if json:
        print_json(found)
        return
    stdout().print(render(found))
