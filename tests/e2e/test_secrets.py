"""Secrets stay secret: a registry password never reaches a command line, a log or a screen,
and what haifctl creates in its home is its owner's alone."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.e2e.conftest import Run


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def cmdlines() -> dict[int, str]:
    """Every process's command line, as any user of the machine can read it."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue  # gone meanwhile
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cluster_keeps_the_registry_password_off_command_lines(
    haifctl: Run, home: Path, postgres_url: str
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"  # the trust-auth test server accepts any password
    env = {"HAIF_REGISTRY_URL": with_password(postgres_url, secret), "HAIF_THREADS": "1"}
    assert not home.exists()
    up = haifctl("up", "--workers", "1", "--bridge-bind", "127.0.0.1:0", env=env)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        status = haifctl("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        pids = [info["supervisor_pid"], *(d["pid"] for d in info["daemons"])]
        assert len(pids) == 6  # supervisor, registry, orchestrator, gateway, bridge, worker
        lines = cmdlines()
        for pid in pids:
            assert pid in lines, f"daemon {pid} is not running"
            assert "haifctl" in lines[pid]
        leaks = {pid: line for pid, line in lines.items() if secret in line}
        assert leaks == {}, "the registry password is on a command line"
        # the daemons did get the URL: the registry daemon serves this Postgres schema
        listed = haifctl("models", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert "stories260K" in listed.stdout
        # `status` says which registry the cluster serves, password masked
        assert info["registry"] == with_password(postgres_url, "********")
        table = haifctl("status", env=env).stdout
        assert "registry: postgresql://postgres:********@" in table
        assert secret not in table + status.stdout + up.stdout + up.stderr
        # private: the home haifctl created, its run and log folders, every log file
        assert mode(home) == 0o700
        assert mode(home / "run") == 0o700
        assert mode(home / "logs") == 0o700
        logs = sorted((home / "logs").glob("*.log"))
        assert {p.stem for p in logs} >= {"supervisor", "registry", "gateway", "worker-1"}
        for log in logs:
            assert mode(log) == 0o600, log
            assert secret not in log.read_text(errors="replace"), log
        assert mode(home / "run" / "cluster.json") == 0o600
    finally:
        down = haifctl("down", env=env)
    assert down.returncode == 0, down.stderr


def test_config_show_masks_both_password_forms(haifctl: Run) -> None:
    urls = {
        "postgresql://u:hunter2@db:5432/models": "postgresql://u:********@db:5432/models",
        "postgresql://u@db/models?sslmode=disable&password=hunter2": (
            "postgresql://u@db/models?sslmode=disable&password=********"
        ),
    }
    for url, shown in urls.items():
        proc = haifctl("config", "show", "--json", env={"HAIF_REGISTRY_URL": url})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["settings"]["registry_url"]["value"] == shown
        table = haifctl("config", "show", env={"HAIF_REGISTRY_URL": url})
        assert shown in table.stdout
        assert "hunter2" not in proc.stdout + table.stdout


def test_registry_errors_mask_the_password(haifctl: Run) -> None:
    for url in (
        "postgresql://u:hunter2@127.0.0.1:1/models",
        "postgresql://u@127.0.0.1:1/models?password=hunter2",
    ):
        proc = haifctl("models", "list", env={"HAIF_REGISTRY_URL": url})
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.startswith("error: cannot reach the Postgres registry at postgresql://")
        assert "********" in proc.stderr
        assert "hunter2" not in proc.stderr + proc.stdout
