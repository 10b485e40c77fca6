"""Where a local cluster keeps its state and logs: the one reader and writer of the supervisor's
state file, ``HOME/run/cluster.json`` (the CLI reads it without importing ZeroMQ)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"
SCALE_FILE = "scale.json"  # a scale request: the CLI writes it, then sends the supervisor SIGUSR1
SCALE_LOCK = "scale.lock"  # held by the CLI from writing a request to its acknowledgement
# cluster.json names this when its supervisor reads scale requests: one that does not would die
# of the SIGUSR1 (its default action), so the CLI sends none to it
SCALE_PROTOCOL = 1


def run_dir(home: Path) -> Path:
    return home / "run"


def log_dir(home: Path) -> Path:
    return home / "logs"


def state_path(home: Path) -> Path:
    return run_dir(home) / STATE_FILE


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(home).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_state(home: Path, data: dict[str, Any]) -> None:
    path = state_path(home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)  # it names the registry URL, which may hold a password
    tmp.replace(path)


def remove_state(home: Path) -> None:
    state_path(home).unlink(missing_ok=True)


def scale_request_path(home: Path) -> Path:
    return run_dir(home) / SCALE_FILE


def write_scale_request(home: Path, data: dict[str, Any]) -> None:
    path = scale_request_path(home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o600)
    tmp.replace(path)  # the supervisor never reads half a request


def read_scale_request(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(scale_request_path(home).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def running_state(home: Path) -> dict[str, Any] | None:
    """The cluster's state, if its supervisor is alive."""
    data = read_state(home)
    if data is None or not pid_alive(int(data.get("supervisor_pid", 0))):
        return None
    return data


def daemon_endpoint(data: dict[str, Any], name: str) -> str:
    for daemon in data.get("daemons", []):
        if daemon.get("name") == name:
            return str(daemon.get("endpoint", ""))
    return ""


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def cluster_registry(home: Path, registry_url: str) -> str | None:
    """The registry daemon's address, if a cluster on this same registry is up."""
    data = running_state(home)
    if data is None or data.get("state") != "ready" or data.get("registry_url") != registry_url:
        return None
    return daemon_endpoint(data, "registry") or None
