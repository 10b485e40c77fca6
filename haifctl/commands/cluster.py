"""`haifctl up|down|status|logs`: the local cluster's lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from haifctl import security
from haifctl.client import ClusterClient
from haifctl.commands._dispatch import cluster_model_ref, open_cli_registry
from haifctl.commands._shared import JsonFlag, print_json, state, stderr, stdout, want_json
from haifctl.config import mask_url
from haifctl.daemon.state import (
    daemon_endpoint,
    log_dir,
    pid_alive,
    read_state,
    remove_state,
    run_dir,
    running_state,
)
from haifctl.errors import HaifError, InvalidInput, Unavailable
from haifctl.files import open_log, private_dir, write_run_marker


class RestartPolicy(StrEnum):
    always = "always"
    on_failure = "on-failure"
    never = "never"


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []


def _uptime(started: float) -> str:
    seconds = int(time.time() - started)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def up(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes.")] = 1,
    gateways: Annotated[
        int,
        typer.Option(
            "--gateways",
            min=1,
            help="Gateway processes (they share limits through HAIF_REDIS_URL when it is set).",
        ),
    ] = 1,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model for the workers (repeatable; workers take turns). "
            "[env: HAIF_MODEL, MODEL_ID]",
        ),
    ] = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Supervise from this terminal; Ctrl-C stops.")
    ] = False,
    orchestrator_bind: Annotated[
        str,
        typer.Option(
            "--orchestrator-bind", help="Where workers join; tcp://0.0.0.0:PORT for remote ones."
        ),
    ] = "tcp://127.0.0.1:0",
    gateway_bind: Annotated[
        str, typer.Option("--gateway-bind", help="Where clients connect.")
    ] = "tcp://127.0.0.1:0",
    restart: Annotated[
        RestartPolicy, typer.Option("--restart", help="Restart daemons that exit.")
    ] = RestartPolicy.on_failure,
    heartbeat_timeout: Annotated[
        float | None,
        typer.Option(
            "--heartbeat-timeout",
            help="Seconds before a silent worker is dropped. [env: HAIF_HEARTBEAT_TIMEOUT]",
        ),
    ] = None,
    bridge_bind: Annotated[
        str | None,
        typer.Option(
            "--bridge-bind",
            help="HOST:PORT for the HTTP bridge. [env: HAIF_BRIDGE_BIND]",
            show_default=False,
        ),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(
            "--registry-url",
            help="The registry the cluster serves. [env: HAIF_REGISTRY_URL]",
            show_default=False,
        ),
    ] = None,
    metrics_base_port: Annotated[
        int,
        typer.Option(
            "--metrics-base-port",
            min=0,
            help="Give the daemons /metrics ports BASE, BASE+1, ... (0: any free ports).",
        ),
    ] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for readiness.")
    ] = 120.0,
) -> None:
    """Start the local cluster: registry, orchestrator, gateway and workers.

    Returns once every daemon is ready and every worker has joined. Run again while the cluster
    is up, it scales the workers to --workers (as `haifctl scale` does) and refuses any other
    flag that differs from what runs (exit 2, nothing changed): those need `haifctl down` first.

    Examples:

      haifctl up

      haifctl up --workers 2 --model llama3.2-1b --bridge-bind 127.0.0.1:0
    """
    settings = state(ctx).settings(
        registry_url=registry_url, heartbeat_timeout=heartbeat_timeout, bridge_bind=bridge_bind
    )
    home = settings.home
    current = running_state(home)
    if current is not None:
        from haifctl.commands.scale import up_running

        up_running(ctx, settings, current)
        return
    preflight(settings.bridge_bind, orchestrator_bind, gateway_bind, home)
    models = [cluster_model_ref(m) for m in model or [settings.model]]
    with open_cli_registry(settings) as registry:  # unknown models fail here, not in a worker
        refs = [registry.resolve(m).ref for m in models]
    args = [
        sys.executable,
        "-m",
        "haifctl",
        "--home",
        str(home),
        "daemon",
        "supervise",
        "--workers",
        str(workers),
        "--gateways",
        str(gateways),
        "--orchestrator-bind",
        orchestrator_bind,
        "--gateway-bind",
        gateway_bind,
        "--restart",
        restart.value,
        "--heartbeat-timeout",
        str(settings.heartbeat_timeout),
        "--bridge-bind",
        settings.bridge_bind,
        "--metrics-base-port",
        str(metrics_base_port),
    ]
    for ref in refs:
        args += ["--model", ref]
    run = round(time.time(), 3)  # this run's id: where each log's part of it starts
    args += ["--run", str(run)]
    # the registry URL may hold a password: the environment carries it (to the supervisor, and
    # from it to the daemons), never a command line that `ps` shows to every user
    env = {**os.environ, "HAIF_REGISTRY_URL": settings.registry_url}
    keyring = security.local(home)  # the cluster's keys, made here, not raced by the daemons
    if foreground:
        os.execve(sys.executable, args, env)
    private_dir(log_dir(home))
    private_dir(run_dir(home))
    remove_state(home)
    logfile = open_log(log_dir(home) / "supervisor.log")  # 0600
    try:
        write_run_marker(logfile, "supervisor", run)
        supervisor = subprocess.Popen(
            args,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(logfile)
    data = _wait_ready(home, supervisor, timeout)
    gateway = daemon_endpoint(data, "gateway")
    _wait_workers(gateway, workers, time.monotonic() + timeout, keyring)
    out = stdout()
    out.print(f"cluster up: {workers} worker(s) serving {', '.join(refs)}")
    out.print(
        f"  http          {daemon_endpoint(data, 'bridge')}  (OpenAI API under /v1, chat page at /)"
    )
    out.print(f"  gateway       {gateway}")
    for i in range(2, gateways + 1):
        out.print(f"  gateway-{i:<5} {daemon_endpoint(data, f'gateway-{i}')}")
    out.print(
        f"  orchestrator  {daemon_endpoint(data, 'orchestrator')}"
        "  (remote workers: haifctl join-token, then haifctl worker --orchestrator ADDRESS"
        " --join TOKEN)"
    )
    out.print(f"  logs          {log_dir(home)}  (haifctl logs)")
    from haifctl.keys import KeyStore

    if not KeyStore(home).enabled:
        out.print(
            "no API keys configured: the HTTP API is open, on loopback only "
            "(haifctl keys create to require keys)"
        )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def preflight(bridge_bind: str, orchestrator_bind: str, gateway_bind: str, home: Path) -> None:
    """Check every address and probe every fixed port before anything starts: a mistake is one
    `error:` line (exit 2), not a daemon failing after the others were spawned."""
    from haifctl.keys import KeyStore

    addresses = [("--bridge-bind", _host_port(bridge_bind, "--bridge-bind", http=True))]
    for flag, value in (
        ("--orchestrator-bind", orchestrator_bind),
        ("--gateway-bind", gateway_bind),
    ):
        if not value.startswith("tcp://"):
            raise InvalidInput(
                "bad_address",
                f"{flag} {value!r} is not tcp://HOST:PORT",
                f"e.g. {flag} tcp://127.0.0.1:0",
            )
        addresses.append((flag, _host_port(value.removeprefix("tcp://"), flag)))
    host = addresses[0][1][0]
    if host not in LOOPBACK and not KeyStore(home).enabled:
        raise InvalidInput(
            "bridge_needs_keys",
            f"no API keys are configured, so the bridge only listens on loopback, not {host}",
            "create one with `haifctl keys create`, or bind to 127.0.0.1",
        )
    for flag, (host, port) in addresses:
        if port:
            _probe(flag, host, port)


def _host_port(value: str, flag: str, http: bool = False) -> tuple[str, int]:
    host, _, port = value.removeprefix("http://" if http else "").rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise InvalidInput(
            "bad_address",
            f"{flag} {value!r}: the port must be a number from 0 to 65535",
            f"e.g. {flag} {'127.0.0.1:8080' if http else 'tcp://127.0.0.1:0'} (0: any free port)",
        )
    return ("0.0.0.0" if host == "*" else host), int(port)


def _probe(flag: str, host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidInput(
                "address_unavailable",
                f"{flag}: cannot listen on {host}:{port}: {exc.strerror}",
                f"pick another port ({flag} ...:0 takes any free one), or stop what uses it",
            ) from None


def _wait_ready(home: Path, supervisor: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        data = read_state(home)
        if data is not None and data.get("supervisor_pid") == supervisor.pid:
            if data.get("state") == "ready":
                return data
            if data.get("state") == "failed":
                break
        if supervisor.poll() is not None or time.monotonic() > end:
            break
        time.sleep(0.05)  # polling the supervisor's state file: a readiness probe
    if supervisor.poll() is None:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)
    data = read_state(home) or {}
    failed = str(data.get("failed") or "supervisor")
    remove_state(home)
    err = stderr()
    for line in _tail(log_dir(home) / f"{failed}.log", 12):
        err.print(f"  {failed}| {line}", markup=False)
    raise HaifError(
        "cluster_failed",
        f"the cluster did not start: {failed} failed",
        f"its last log lines are above; all logs are in {log_dir(home)}",
    )


def _wait_workers(gateway: str, n: int, deadline: float, keyring: security.Keyring) -> None:
    with ClusterClient(gateway, keyring) as client:
        while True:
            try:
                if client.ping().ready and len(client.stats().workers) >= n:
                    return
            except Unavailable:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(
                    "cluster_not_ready",
                    f"fewer than {n} workers joined in time",
                    "see `haifctl logs`",
                )
            time.sleep(0.05)


def down(
    ctx: typer.Context,
    grace: Annotated[
        float, typer.Option("--grace", help="Seconds to let in-flight requests finish.")
    ] = 30.0,
) -> None:
    """Stop the cluster: drain in-flight requests, then stop every daemon.

    Examples:

      haifctl down

      haifctl down --grace 5
    """
    home = state(ctx).settings().home
    data = read_state(home)
    if data is None:
        stdout().print("no cluster is running")
        return
    pid = int(data.get("supervisor_pid", 0))
    daemons = [int(d.get("pid", 0)) for d in data.get("daemons", [])]
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + grace + 15
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
    leftovers = [p for p in [pid, *daemons] if pid_alive(p)]
    for p in leftovers:
        os.kill(p, signal.SIGKILL)
    remove_state(home)
    message = "cluster stopped"
    if leftovers:
        message += f" ({len(leftovers)} process(es) did not drain in time and were killed)"
    stdout().print(message)


def status(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Show each daemon (pid, address, state, uptime, restarts) and each worker's load.

    Examples:

      haifctl status

      haifctl status --json | jq '.workers[].busy'
    """
    want_json(ctx, json)
    home = state(ctx).settings().home
    data = running_state(home)
    if data is None:
        raise Unavailable("not_running", "no cluster is running", "start one with: haifctl up")
    daemons = []
    for d in data.get("daemons", []):
        alive = pid_alive(int(d.get("pid", 0)))
        daemons.append(
            {
                **d,
                "state": d.get("state") if alive else "dead",
                "uptime_s": round(time.time() - float(d.get("started_at", 0)), 1),
            }
        )
    workers: list[dict[str, Any]] = []
    queues: dict[str, int] = {}
    gateway = daemon_endpoint(data, "gateway")
    if gateway:
        try:
            with ClusterClient(gateway, security.local(home)) as client:
                stats = client.stats(timeout=2.0)
            workers = [msgspec.to_builtins(w) for w in stats.workers]
            queues = stats.queues
        except HaifError as exc:
            stderr().print(f"warning: could not read worker stats: {exc.message}", markup=False)
    if json:
        print_json(
            {
                "state": data.get("state"),
                "supervisor_pid": data.get("supervisor_pid"),
                "registry": mask_url(str(data.get("registry_url", ""))),
                "workers_target": data.get("workers_target"),
                "daemons": daemons,
                "retired": data.get("retired", []),  # workers scaled away, with their exit status
                "workers": workers,
                "queues": queues,
            }
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("DAEMON", "PID", "ADDRESS", "METRICS", "STATE", "UPTIME", "RESTARTS"):
        table.add_column(column)
    for d in daemons:
        table.add_row(
            d["name"],
            str(d["pid"]),
            d.get("endpoint") or "-",
            d.get("metrics") or "-",
            d["state"],
            _uptime(float(d["started_at"])),
            str(d["restarts"]),
        )
    out = stdout()
    out.print(table)
    out.print(f"\nregistry: {mask_url(str(data.get('registry_url', '')))}", markup=False)
    wt = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WORKER", "MODEL", "DEVICE", "LOAD", "SERVED", "TOKENS", "ERRORS", "HOST"):
        wt.add_column(column)
    for w in workers:
        wt.add_row(
            w["worker_id"],
            ", ".join(w["models"]),
            w["device"],
            f"{w['busy']}/{w['slots']}",
            str(w["served"]),
            str(w["tokens"]),
            str(w["errors"]),
            w["host"],
        )
    out.print()
    out.print(wt)
    if any(queues.values()):
        out.print("\nqueued: " + ", ".join(f"{k} {v}" for k, v in queues.items() if v))
