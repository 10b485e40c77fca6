"""`haifctl top`: a live view of the cluster."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from haifctl import security, wire
from haifctl.client import ClusterClient
from haifctl.commands._shared import JsonFlag, print_json, state, stdout, want_json
from haifctl.commands.ps import keep_alive_left, processor
from haifctl.commands.ps import rows as ps_rows
from haifctl.daemon.state import daemon_endpoint, pid_alive, running_state
from haifctl.errors import Unavailable
from haifctl.placement import human_bytes


class Sort(StrEnum):
    name = "name"
    load = "load"
    served = "served"
    tokens = "tokens/s"


SORTS = tuple(s.value for s in Sort)


def usage(pid: int) -> tuple[float | None, int | None]:
    """A process's CPU seconds so far (user + system, every thread) and resident memory, from
    /proc (None where there is none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None, None
    ticks = os.sysconf("SC_CLK_TCK")
    return round((int(stat[11]) + int(stat[12])) / ticks, 2), pages * os.sysconf("SC_PAGE_SIZE")


def snapshot(home: Any, gateway_override: str | None = None) -> dict[str, Any]:
    """Everything top shows, from the cluster state file and the gateway's stats RPC."""
    data = running_state(home) if gateway_override is None else None
    gateway = gateway_override or (daemon_endpoint(data, "gateway") if data else "")
    if not gateway:
        raise Unavailable("not_running", "no cluster is running", "start one with: haifctl up")
    daemons = []
    if data is not None:
        for d in data.get("daemons", []):
            alive = pid_alive(int(d.get("pid", 0)))
            cpu_s, rss = usage(int(d.get("pid", 0))) if alive else (None, None)
            daemons.append(
                {
                    "name": d["name"],
                    "pid": d["pid"],
                    "state": d["state"] if alive else "dead",
                    "uptime_s": round(time.time() - float(d["started_at"]), 1),
                    "restarts": d["restarts"],
                    "cpu_s": cpu_s,
                    "rss_bytes": rss,
                }
            )
    with ClusterClient(gateway, security.local(home)) as client:
        stats = client.stats(timeout=2.0)
    window = msgspec.to_builtins(stats.window) if stats.window else {}
    per_worker = window.get("worker_tokens_per_s", {}) if window else {}
    workers = []
    for w in stats.workers:
        row = msgspec.to_builtins(w)
        row["tokens_per_s"] = per_worker.get(w.worker_id, 0.0)
        workers.append(row)
    return {
        "time": time.time(),
        "daemons": daemons,
        "workers": workers,
        "queues": stats.queues,
        "window": window,
        "counters": stats.counters,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render(snap: dict[str, Any], sort: str, live: bool = True) -> Group:
    """The view; ``live`` adds the keys that work in it (not in a one-off snapshot)."""
    w = snap["window"] or {}
    head = Text.assemble(
        ("haifctl top", "bold"),
        "  ",
        f"last {w.get('seconds', 0):.0f}s: {w.get('requests_per_s', 0):.2f} req/s · "
        f"{w.get('tokens_per_s', 0):,.0f} tok/s · latency p50 {_ms(w.get('latency_p50_ms'))} / "
        f"p95 {_ms(w.get('latency_p95_ms'))} ms · TTFT p50 {_ms(w.get('ttft_p50_ms'))} / "
        f"p95 {_ms(w.get('ttft_p95_ms'))} ms · errors {w.get('errors', 0)}",
    )
    daemons = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for column in ("DAEMON", "PID", "STATE", "UPTIME", "RESTARTS", "CPU", "MEMORY"):
        daemons.add_column(column)
    for d in snap["daemons"]:
        cpu, rss = d.get("cpu_s"), d.get("rss_bytes")
        daemons.add_row(
            d["name"],
            str(d["pid"]),
            d["state"],
            f"{d['uptime_s']:.0f}s",
            str(d["restarts"]),
            "-" if cpu is None else f"{100 * cpu / max(1.0, d['uptime_s']):.1f}%",
            "-" if rss is None else human_bytes(rss),
        )
    keys = {
        "name": lambda r: r["worker_id"],
        "load": lambda r: -r["busy"] / max(1, r["slots"]),
        "served": lambda r: -r["served"],
        "tokens/s": lambda r: -r["tokens_per_s"],
    }
    workers = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WORKER", "MODEL", "DEVICE", "SLOTS", "TOK/S", "SERVED", "ERRORS", "HOST"):
        workers.add_column(column)
    for r in sorted(snap["workers"], key=keys[sort]):
        device = r["device"] + (f" ({r['gpu_name']})" if r.get("gpu_name") else "")
        workers.add_row(
            r["worker_id"],
            ", ".join(r["models"]),
            device,
            f"{r['busy']}/{r['slots']}",
            f"{r['tokens_per_s']:,.0f}",
            str(r["served"]),
            str(r["errors"]),
            r["host"],
        )
    models = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WORKER", "MODEL", "SIZE", "PROCESSOR", "SLOTS", "KEEP-ALIVE", "SERVED"):
        models.add_column(column)
    for row in ps_rows([msgspec.convert(r, wire.WorkerState) for r in snap["workers"]]):
        if row["state"] == "loading" or "size_bytes" not in row:
            models.add_row(row["worker"], row["model"], "-", "-", "-", row["state"], "-")
            continue
        models.add_row(
            row["worker"],
            row["model"],
            human_bytes(row["size_bytes"]),
            processor(row),
            f"{row['busy']}/{row['slots']}",
            keep_alive_left(row["keep_alive_left_s"]),
            str(row["served"]),
        )
    queues = Table(box=None, header_style="bold", pad_edge=False)
    queues.add_column("MODEL")
    queues.add_column("QUEUED")
    for model, depth in sorted(snap["queues"].items()):
        queues.add_row(model, str(depth))
    footer = Text(f"sorted by {sort}" + (" · s: sort · q: quit" if live else ""), style="dim")
    return Group(
        head, Text(), daemons, Text(), workers, Text(), models, Text(), queues, Text(), footer
    )


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """Single keypresses from the terminal, if there is one."""
    if not sys.stdin.isatty():
        yield False
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    json: JsonFlag = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")
    ] = 1.0,
    sort_by: Annotated[
        Sort, typer.Option("--sort", help="Order of the workers (s changes it while live).")
    ] = Sort.name,
    gateway: Annotated[
        str | None,
        typer.Option("--gateway", help="A gateway to watch instead of the local cluster."),
    ] = None,
) -> None:
    """Watch daemons, workers, loaded models, queues, throughput and latency, live.

    Each daemon's CPU and memory, each worker's load and models, refreshed every second.

    Keys while it runs: s changes the sort, q quits.

    Examples:

      haifctl top

      haifctl top --once --sort load

      haifctl top --json | jq .window
    """
    want_json(ctx, json)
    home = state(ctx).settings().home
    sort = sort_by.value
    if json:
        print_json(snapshot(home, gateway))
        return
    if once:
        stdout().print(render(snapshot(home, gateway), sort, live=False))
        return
    with (
        _keys() as interactive,
        Live(render(snapshot(home, gateway), sort), screen=False, auto_refresh=False) as live,
    ):
        next_at = 0.0
        while True:
            now = time.monotonic()
            if now >= next_at:
                live.update(render(snapshot(home, gateway), sort), refresh=True)
                next_at = now + interval
            if not interactive:
                time.sleep(max(0.0, next_at - time.monotonic()))
                continue
            ready, _, _ = select.select([sys.stdin], [], [], max(0.0, next_at - time.monotonic()))
            if ready:
                key = os.read(sys.stdin.fileno(), 1).decode(errors="ignore").lower()
                if key == "q":
                    return
                if key == "s":
                    sort = SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
                    next_at = 0.0
