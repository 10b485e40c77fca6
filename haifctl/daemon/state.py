"""Where a local cluster keeps its state and logs (read by the CLI without importing ZeroMQ)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"


def run_dir(home: Path) -> Path:
    return home / "run"


def log_dir(home: Path) -> Path:
    return home / "logs"


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir(home) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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
    data = read_state(home)
    if data is None or data.get("state") != "ready" or data.get("registry_url") != registry_url:
        return None
    if not pid_alive(int(data.get("supervisor_pid", 0))):
        return None
    for daemon in data.get("daemons", []):
        if daemon.get("name") == "registry" and daemon.get("endpoint"):
            return str(daemon["endpoint"])
    return None
