"""`haifctl scale workers=N`, and `haifctl up` on a running cluster: change the number of local
workers without a restart, and say which of `up`'s other flags cannot change while it runs.

The CLI asks; the supervisor acts (see haifctl/daemon/supervisor.py for why).  The CLI writes
the target to ``HOME/run/scale.json`` under a lock, sends the supervisor SIGUSR1, waits for its
acknowledgement in ``cluster.json``, then waits until the new workers have joined the
orchestrator and the retired ones have drained their streams, exited and left its table.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from haifctl import security
from haifctl.client import ClusterClient
from haifctl.commands._shared import JsonFlag, print_json, state, stderr, stdout, want_json
from haifctl.config import Settings, mask_url
from haifctl.daemon.state import (
    SCALE_LOCK,
    SCALE_PROTOCOL,
    daemon_endpoint,
    read_state,
    run_dir,
    running_state,
    write_scale_request,
)
from haifctl.errors import HaifError, InvalidInput, Kind, Unavailable

ACK_TIMEOUT_S = 10.0  # the supervisor reads a request within a tick (0.1 s) of the signal
POLL_S = 0.05  # how often the state file and the orchestrator's table are looked at
SCALE_HINT = "to change only the workers: haifctl scale workers=N"


def scale(
    ctx: typer.Context,
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="What to scale and to how many: workers=N.", show_default=False),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, help="Worker processes (the same as workers=N)."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="Wait until new workers have joined and retired ones have finished their "
            "streams and exited.",
        ),
    ] = True,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for it.")
    ] = 120.0,
    json: JsonFlag = False,
) -> None:
    """Add or retire local workers while the cluster runs.

    Retired workers are the least busy ones: they take no new requests and finish the streams
    they have before they exit, and the supervisor does not start them again. The workers keep
    taking turns over the cluster's models, so no model loses its last worker.

    Examples:

      haifctl scale workers=3

      haifctl scale --workers 1 --no-wait
    """
    want_json(ctx, json)
    target = _parse_targets(targets or [], workers)
    home = state(ctx).settings().home
    data = running_state(home)
    if data is None:
        raise Unavailable("not_running", "no cluster is running", "start one with: haifctl up")
    result = scale_workers(home, data, target, timeout=timeout, wait=wait, quiet=json)
    if json:
        print_json(result)
    _exit_for(result)


def _parse_targets(targets: list[str], workers: int | None) -> int:
    wanted: int | None = None
    for item in targets:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(
                "bad_scale", f"{item!r} is not NAME=N", "e.g. haifctl scale workers=3"
            )
        if key.strip() != "workers":
            raise InvalidInput(
                "bad_scale",
                f"only workers can be scaled while the cluster runs, not {key.strip()!r}",
                "for the rest: haifctl down, then haifctl up with the new flags",
            )
        if not value.strip().isdigit() or int(value) < 1:
            raise InvalidInput(
                "bad_scale", f"workers={value}: give a whole number of 1 or more", "e.g. workers=3"
            )
        if wanted is not None and wanted != int(value):
            raise InvalidInput("bad_scale", "workers is given twice, with different numbers")
        wanted = int(value)
    if workers is not None and wanted is not None and workers != wanted:
        raise InvalidInput(
            "bad_scale", f"--workers {workers} and workers={wanted} disagree", "give one of them"
        )
    target = workers if workers is not None else wanted
    if target is None:
        raise InvalidInput("bad_scale", "say how many workers", "e.g. haifctl scale workers=3")
    return target


def _exit_for(result: dict[str, Any]) -> None:
    """Exit 1 when a retired worker did not exit cleanly (it was killed past its drain grace,
    or crashed while draining): its streams may not have finished."""
    if any(r["returncode"] != 0 for r in result.get("retired", [])):
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------
def scale_workers(
    home: Path, data: dict[str, Any], target: int, *, timeout: float, wait: bool, quiet: bool
) -> dict[str, Any]:
    """Ask the supervisor for ``target`` workers and, with ``wait``, wait for them: the result
    names the workers added, retired (with their exit status) and, without ``wait``, still
    draining."""
    if data.get("state") != "ready":
        raise Unavailable(
            "cluster_not_ready",
            f"the cluster is {data.get('state', 'starting')}, not ready",
            "try again once `haifctl status` shows it running",
        )
    if data.get("scale_protocol") != SCALE_PROTOCOL:
        raise HaifError(
            "cannot_scale",
            "this cluster's supervisor comes from a haifctl that cannot scale a running cluster",
            "haifctl down, then haifctl up --workers N",
            kind=Kind.unavailable,
        )
    was = int(data.get("workers_target", 0))
    out = stdout() if not quiet else None
    if target == was:
        if out:
            out.print(f"cluster already has {was} worker(s)")
        return {"workers": target, "was": was, "added": [], "retired": [], "draining": []}
    deadline = time.monotonic() + timeout
    keyring = security.local(home)
    gateway = daemon_endpoint(data, "gateway")
    busy = _busy(gateway, keyring)
    ack = _request(home, int(data["supervisor_pid"]), target, busy, deadline)
    added, retiring = list(ack.get("added", [])), list(ack.get("retiring", []))
    if out:
        out.print(f"scaling workers {was} -> {target}")
        for name in added:
            out.print(f"  starting {name}")
        for name in retiring:
            streams = busy.get(name, 0)
            out.print(f"  draining {name} ({streams} stream(s) in flight; it finishes them first)")
    result: dict[str, Any] = {"workers": target, "was": was, "added": added, "retired": []}
    if not wait:
        result["draining"] = retiring
        return result
    retired = _wait(home, gateway, keyring, str(ack["id"]), added, retiring, deadline)
    result["retired"], result["draining"] = retired, []
    if out:
        for r in retired:
            how = "drained" if r["returncode"] == 0 else "did not exit cleanly"
            out.print(f"  retired {r['name']} ({how}, exit {r['returncode']})")
        out.print(f"cluster scaled: {target} worker(s)")
    return result


def _busy(gateway: str, keyring: security.Keyring) -> dict[str, int]:
    """Each worker's streams in flight, so that the least busy retire; without them (the
    orchestrator does not answer) the newest retire."""
    try:
        with ClusterClient(gateway, keyring) as client:
            return {w.worker_id: w.busy for w in client.stats(timeout=2.0).workers}
    except HaifError as exc:
        stderr().print(f"warning: could not read the workers' load: {exc.message}", markup=False)
        return {}


def _request(
    home: Path, pid: int, target: int, busy: dict[str, int], deadline: float
) -> dict[str, Any]:
    """Hand the supervisor the request and wait for its acknowledgement.  The lock keeps two
    `scale` commands from overwriting each other's request before it is read."""
    rid = uuid.uuid4().hex
    lock = os.open(run_dir(home) / SCALE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        "scale_busy", "another scale of this cluster is still being read"
                    ) from None
                time.sleep(POLL_S)
        write_scale_request(home, {"id": rid, "workers": target, "busy": busy})
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            raise Unavailable("not_running", "the cluster's supervisor has exited") from None
        end = min(deadline, time.monotonic() + ACK_TIMEOUT_S)
        while True:
            data = read_state(home) or {}
            ack = data.get("scale") or {}
            if ack.get("id") == rid:
                break
            if data.get("supervisor_pid") != pid or time.monotonic() > end:
                raise Unavailable(
                    "scale_unanswered",
                    "the cluster's supervisor did not take the scale request",
                    "see haifctl logs supervisor",
                )
            time.sleep(POLL_S)
    finally:
        os.close(lock)  # releases the lock
    if ack.get("error"):
        raise InvalidInput("bad_scale", str(ack["error"]))
    return dict(ack)


def _wait(
    home: Path,
    gateway: str,
    keyring: security.Keyring,
    rid: str,
    added: list[str],
    retiring: list[str],
    deadline: float,
) -> list[dict[str, Any]]:
    """Until the added workers have joined the orchestrator and the retiring ones have exited
    and left its table (it drops them a heartbeat timeout after their last heartbeat)."""
    with ClusterClient(gateway, keyring) as client:
        while True:
            data = read_state(home) or {}
            if data.get("state") != "ready":
                raise Unavailable("not_running", "the cluster stopped while it scaled")
            daemons = {d.get("name"): d for d in data.get("daemons", [])}
            if (data.get("scale") or {}).get("id") != rid:
                raise Unavailable(
                    "scale_superseded",
                    "another scale of this cluster was asked for while this one waited",
                    "haifctl status shows where it stands",
                )
            exited = {r.get("name"): r for r in data.get("retired", [])}
            gone = all(n not in daemons and n in exited for n in retiring)
            started = all(daemons.get(n, {}).get("state") == "running" for n in added)
            if gone and started:
                try:
                    ids = {w.worker_id for w in client.stats(timeout=2.0).workers}
                except HaifError:
                    ids = None
                if ids is not None and set(added) <= ids and not ids & set(retiring):
                    return [
                        {k: exited[n].get(k) for k in ("name", "pid", "returncode")}
                        for n in retiring
                    ]
            if time.monotonic() > deadline:
                raise HaifError(
                    "scale_timeout",
                    "the workers did not reach their new number in time",
                    "haifctl status shows where they stand; haifctl logs, why",
                    kind=Kind.timeout,
                )
            time.sleep(POLL_S)


# ------------------------------------------------------------------------------------------------
def up_running(ctx: typer.Context, settings: Settings, data: dict[str, Any]) -> None:
    """`haifctl up` on a running cluster: scale it to ``--workers`` if that was given, after
    checking that no other flag asks for what only a restart could do.  A flag that differs
    from what runs refuses the whole command (exit 2), scaling included: a command that
    half-applies and fails leaves a script unsure what it changed."""
    given = ctx.params  # `up`'s flags, by parameter name
    explicit = {
        name: value
        for name, value in given.items()
        if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    }  # (typer carries its own click: its ParameterSource is not importable as click's)
    conflicts = _conflicts(settings, data, explicit)
    if conflicts:
        err = stderr()
        for line in conflicts[:-1]:
            err.print(f"error: {line}", markup=False)
        raise InvalidInput(
            "cluster_running",
            conflicts[-1],
            "these apply only when the cluster starts: haifctl down first, then haifctl up "
            f"with them ({SCALE_HINT})",
        )
    workers = explicit.get("workers")
    if workers is None or workers == data.get("workers_target"):
        stdout().print(f"cluster already running (gateway {daemon_endpoint(data, 'gateway')})")
        return
    timeout = float(given.get("timeout") or 120.0)
    result = scale_workers(
        settings.home, data, int(workers), timeout=timeout, wait=True, quiet=False
    )
    _exit_for(result)


def _conflicts(settings: Settings, data: dict[str, Any], explicit: dict[str, Any]) -> list[str]:
    """One line per flag whose value differs from the running cluster's."""
    config = data.get("config")
    if not isinstance(config, dict):
        rest = sorted(k for k in explicit if k not in ("workers", "timeout"))
        return [
            f"--{k.replace('_', '-')}: cannot compare with a cluster started by an older haifctl"
            for k in rest
        ]
    lines = []

    def differs(flag: str, running: Any) -> None:
        lines.append(f"{flag}: the running cluster has {running}; it cannot change while it runs")

    if explicit.get("foreground"):
        lines.append(
            f"--foreground: the cluster already runs (supervisor pid {data.get('supervisor_pid')})"
        )
    if "gateways" in explicit and explicit["gateways"] != config.get("gateways"):
        differs("--gateways", config.get("gateways"))
    if "model" in explicit:
        running = list(config.get("models") or [])
        if _model_refs(settings, explicit["model"]) != running:
            differs("--model", ", ".join(running))
    for name, daemon in (("orchestrator_bind", "orchestrator"), ("gateway_bind", "gateway")):
        if name in explicit:
            actual = daemon_endpoint(data, daemon).removeprefix("tcp://")
            configured = str(config.get(name, "")).removeprefix("tcp://")
            if not _same_bind(str(explicit[name]).removeprefix("tcp://"), configured, actual):
                differs(f"--{name.replace('_', '-')}", f"tcp://{actual}")
    if "bridge_bind" in explicit:
        actual = daemon_endpoint(data, "bridge").removeprefix("http://")
        configured = str(config.get("bridge_bind", ""))
        if not _same_bind(str(explicit["bridge_bind"]), configured, actual):
            differs("--bridge-bind", actual or "no bridge")
    if "restart" in explicit and str(explicit["restart"]) != config.get("restart"):
        differs("--restart", config.get("restart"))
    if "heartbeat_timeout" in explicit and float(explicit["heartbeat_timeout"]) != float(
        config.get("heartbeat_timeout", 0)
    ):
        differs("--heartbeat-timeout", config.get("heartbeat_timeout"))
    if "metrics_base_port" in explicit and explicit["metrics_base_port"] != config.get(
        "metrics_base_port"
    ):
        differs("--metrics-base-port", config.get("metrics_base_port"))
    if "registry_url" in explicit and explicit["registry_url"] != data.get("registry_url"):
        differs("--registry-url", mask_url(str(data.get("registry_url", ""))))
    return lines


def _model_refs(settings: Settings, models: list[str]) -> list[str]:
    """The references `up` would give its workers (unknown models fail here, exit 2)."""
    from haifctl.commands._dispatch import cluster_model_ref, open_cli_registry

    with open_cli_registry(settings) as registry:
        return [registry.resolve(cluster_model_ref(m)).ref for m in models]


def _same_bind(given: str, configured: str, actual: str) -> bool:
    """Whether HOST:PORT ``given`` is what runs: the same as asked at the start, the address it
    got, or its host with port 0 (any port)."""
    if given in (configured, actual):
        return True
    host, _, port = given.rpartition(":")
    return port == "0" and actual.rpartition(":")[0] == host
