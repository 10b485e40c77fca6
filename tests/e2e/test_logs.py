"""`haifctl logs`: every daemon's log merged by time, one readable line per event, the latest
run by default; filters, raw JSON, following, a terminal's colours; files rotated by size."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.e2e.conftest import HAIFCTL, Run

T0 = 1_795_000_000.0  # the logs' clock: a fixed time, rendered in the zone below
ZONE = "Asia/Kolkata"  # UTC+5:30: a local time that no UTC rendering could match by chance


def record(t: float, daemon: str, msg: str, level: str = "info", **fields: object) -> str:
    return json.dumps({"time": t, "level": level, "daemon": daemon, "msg": msg, **fields})


def stamp(t: float) -> str:
    """Local time, with the date: these events are not from today."""
    local = datetime.fromtimestamp(t, ZoneInfo(ZONE))
    return local.strftime("%Y-%m-%d %H:%M:%S") + f".{local.microsecond // 1000:03d}"


@pytest.fixture
def logs_dir(home: Path) -> Path:
    """Two runs of a small cluster's logs: the first ended in a worker's traceback."""
    d = home / "logs"
    d.mkdir(parents=True)
    first, second = T0, T0 + 100
    (d / "supervisor.log").write_text(
        "\n".join(
            [
                record(first, "supervisor", "run started", run=first),
                record(first + 0.5, "supervisor", "started", target="gateway"),
                record(first + 9, "supervisor", "daemon exited", "warning", target="worker-1"),
                record(second, "supervisor", "run started", run=second),
                record(second + 0.5, "supervisor", "started", target="gateway"),
                record(second + 3, "supervisor", "cluster ready"),
            ]
        )
        + "\n"
    )
    (d / "gateway.log").write_text(
        "\n".join(
            [
                record(first + 1, "gateway", "run started", run=first),
                record(first + 1.2, "gateway", "ready"),
                record(second + 1, "gateway", "run started", run=second),
                record(second + 1.2, "gateway", "ready"),
                record(second + 4, "gateway", "request finished", outcome="ok", tokens=5),
                record(second + 6, "gateway", "request finished", "warning", outcome="timeout"),
            ]
        )
        + "\n"
    )
    (d / "worker-1.log").write_text(
        "\n".join(
            [
                record(first + 2, "worker-1", "run started", run=first),
                record(first + 8, "worker-1", "generation failed", "error", error="boom"),
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "RuntimeError: boom",
                record(second + 2, "worker-1", "run started", run=second),
                record(second + 2.5, "worker-1", "model loaded", model="stories260K:1"),
                "llama_model_loader: loaded meta data",
                record(second + 5, "worker-1", "generation failed", "error", error="again"),
            ]
        )
        + "\n"
    )
    return d


def run_logs(haifctl: Run, *args: str) -> subprocess.CompletedProcess[str]:
    return haifctl("logs", *args, env={"TZ": ZONE})


def test_latest_run_merged_by_time_in_local_time(haifctl: Run, logs_dir: Path) -> None:
    proc = run_logs(haifctl)
    assert proc.returncode == 0, proc.stderr
    second = T0 + 100
    assert proc.stdout.splitlines() == [
        f"{stamp(second)} supervisor   INFO    run started  run={second}",
        f"{stamp(second + 0.5)} supervisor   INFO    started  target=gateway",
        f"{stamp(second + 1)} gateway      INFO    run started  run={second}",
        f"{stamp(second + 1.2)} gateway      INFO    ready",
        f"{stamp(second + 2)} worker-1     INFO    run started  run={second}",
        f"{stamp(second + 2.5)} worker-1     INFO    model loaded  model=stories260K:1",
        f"{stamp(second + 2.5)} worker-1     INFO    llama_model_loader: loaded meta data",
        f"{stamp(second + 3)} supervisor   INFO    cluster ready",
        f"{stamp(second + 4)} gateway      INFO    request finished  outcome=ok tokens=5",
        f"{stamp(second + 5)} worker-1     ERROR   generation failed  error=again",
        f"{stamp(second + 6)} gateway      WARNING request finished  outcome=timeout",
    ]
    assert "boom" not in proc.stdout  # the earlier run's failure is not reprinted

    every = run_logs(haifctl, "--all").stdout.splitlines()
    assert len(every) == 6 + 6 + 9
    assert every[0] == f"{stamp(T0)} supervisor   INFO    run started  run={T0}"
    # a traceback keeps its place and its level, after the error it belongs to
    at = next(i for i, line in enumerate(every) if "Traceback" in line)
    assert "ERROR   generation failed  error=boom" in every[at - 1]
    assert every[at].endswith("ERROR   Traceback (most recent call last):")
    assert every[at + 2].endswith("ERROR   RuntimeError: boom")

    # one or two daemons, the last N, a level floor, a time window
    only = run_logs(haifctl, "gateway", "worker-1", "-n", "3").stdout.splitlines()
    assert [line.split()[2] for line in only] == ["gateway", "worker-1", "gateway"]
    assert "tokens=5" in only[0]
    warned = run_logs(haifctl, "--level", "warning", "--all").stdout
    assert "INFO" not in warned
    assert warned.count("\n") == 7  # 2 warnings, 2 errors, the traceback's 3 lines
    since = datetime.fromtimestamp(T0 + 103.5, ZoneInfo(ZONE)).strftime("%Y-%m-%dT%H:%M:%S.%f")
    window = run_logs(haifctl, "--since", since).stdout.splitlines()
    assert [line.split()[5] for line in window] == ["finished", "failed", "finished"]

    # raw JSON lines, merged the same way; a line that was not JSON becomes one
    raw = [json.loads(line) for line in run_logs(haifctl, "--json", "--all").stdout.splitlines()]
    assert [r["time"] for r in raw] == sorted(r["time"] for r in raw)
    assert raw[0] == {
        "time": T0,
        "level": "info",
        "daemon": "supervisor",
        "msg": "run started",
        "run": T0,
    }
    assert {"raw": True, "msg": "RuntimeError: boom", "level": "error"}.items() <= next(
        r for r in raw if r.get("raw") and "RuntimeError" in r["msg"]
    ).items()

    for args, said in [
        (("nonesuch",), "no log for 'nonesuch'"),
        (("--since", "yesterday-ish"), "is not a duration or a time"),
        (("--level", "loud"), "unknown level 'loud'"),
    ]:
        bad = run_logs(haifctl, *args)
        assert bad.returncode == 2, args
        assert said in bad.stderr
        assert bad.stderr.splitlines()[1].startswith("hint: ")


def test_logs_on_a_terminal_are_coloured(home: Path, logs_dir: Path) -> None:
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [HAIFCTL, "logs", "-n", "3"],
        stdin=child,
        stdout=child,
        stderr=child,
        env={**os.environ, "HAIF_HOME": str(home), "TZ": ZONE, "COLUMNS": "200"},
    )
    os.close(child)
    out = b""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(main)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "\x1b[" in text  # colours
    assert "\x1b[1;31mERROR" in text  # errors in bold red
    assert "the latest run of each daemon, 3 of 11 events" in text  # what it shows, said
    assert stamp(T0 + 106) in text


def test_follow_prints_every_daemon_as_it_writes(home: Path, logs_dir: Path) -> None:
    proc = subprocess.Popen(
        [HAIFCTL, "logs", "-f", "-n", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HAIF_HOME": str(home)},
    )
    assert proc.stdout is not None
    try:

        def next_line() -> dict[str, object]:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "no line within 30s"
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            return json.loads(line)

        assert next_line()["msg"] == "request finished"  # the history: following has begun
        with (logs_dir / "worker-1.log").open("a") as fh:
            fh.write(record(T0 + 200, "worker-1", "from the worker") + "\n")
        assert next_line()["msg"] == "from the worker"
        with (logs_dir / "gateway.log").open("a") as fh:
            fh.write(record(T0 + 201, "gateway", "from the gateway") + "\n")
        assert next_line()["msg"] == "from the gateway"
        # a rotated (truncated) file is read from its start; a new daemon's log is picked up
        os.truncate(logs_dir / "gateway.log", 0)
        with (logs_dir / "gateway.log").open("a") as fh:
            fh.write(record(T0 + 202, "gateway", "after rotation") + "\n")
        assert next_line()["msg"] == "after rotation"
        (logs_dir / "worker-2.log").write_text(record(T0 + 203, "worker-2", "new worker") + "\n")
        assert next_line() == {
            "time": T0 + 203,
            "level": "info",
            "daemon": "worker-2",
            "msg": "new worker",
        }
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_up_rotates_logs_and_marks_each_run(haifctl: Run, home: Path) -> None:
    env = {"HAIF_LOG_MAX_BYTES": "1500", "HAIF_LOG_KEEP": "2"}
    up = haifctl("up", "--bridge-bind", "127.0.0.1:0", env=env)
    assert up.returncode == 0, up.stderr
    try:
        logs = home / "logs"
        end = time.monotonic() + 180
        # each request adds a line to the gateway's log: enough of them rotate it
        while not (logs / "gateway.log.2").exists():
            assert time.monotonic() < end, sorted(p.name for p in logs.iterdir())
            assert haifctl("infer", "Once", "-n", "2").returncode == 0
        assert not (logs / "gateway.log.3").exists()  # two kept
        assert (logs / "gateway.log").stat().st_size < 1500 + 3000  # checked every 2 s
        assert oct((logs / "gateway.log.1").stat().st_mode & 0o777) == "0o600"
        shown = haifctl("logs", "gateway", "-n", "5").stdout
        assert "request finished" in shown
        rotated = haifctl("logs", "supervisor", "-n", "100").stdout
        assert "log rotated  target=gateway keep=2" in rotated
    finally:
        assert haifctl("down").returncode == 0
    first_run = haifctl("logs", "--json", "-n", "1000").stdout.splitlines()
    up = haifctl("up", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr
    try:
        latest = [
            json.loads(line) for line in haifctl("logs", "--json", "-n", "1000").stdout.splitlines()
        ]
        runs = {r["run"] for r in latest if r["msg"] == "run started"}
        assert len(runs) == 1  # one run, the new one: each daemon's log starts at its marker
        assert {r["daemon"] for r in latest if r["msg"] == "run started"} >= {
            "supervisor",
            "registry",
            "orchestrator",
            "gateway",
            "bridge",
            "worker-1",
        }
        assert not any(r["msg"] == "request finished" for r in latest)
        assert all(r["time"] >= min(runs) for r in latest)
        assert len(first_run) > 0
        every = haifctl("logs", "--json", "--all", "-n", "100000").stdout
        assert "request finished" in every
    finally:
        haifctl("down")
