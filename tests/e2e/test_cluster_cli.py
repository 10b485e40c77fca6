"""`haifctl up / status / infer / logs / down` as a user runs them, with real daemons."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from haifctl.daemon.state import pid_alive
from tests.e2e.conftest import HAIFCTL, Run


def status(haifctl: Run) -> dict:
    proc = haifctl("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cluster_lifecycle(haifctl: Run, home: Path, model_path: Path) -> None:
    up = haifctl("up", "--workers", "2", "--heartbeat-timeout", "1", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr + up.stdout
    assert "cluster up: 2 worker(s) serving stories260K:1" in up.stdout
    try:
        again = haifctl("up")
        assert again.returncode == 0
        assert "already running" in again.stdout

        info = status(haifctl)
        names = [d["name"] for d in info["daemons"]]
        assert names == ["registry", "orchestrator", "gateway", "bridge", "worker-1", "worker-2"]
        bridge = next(d["endpoint"] for d in info["daemons"] if d["name"] == "bridge")
        assert bridge.startswith("http://127.0.0.1:")
        assert "no API keys configured" in up.stdout
        assert all(d["state"] == "running" and pid_alive(d["pid"]) for d in info["daemons"])
        assert sorted(w["worker_id"] for w in info["workers"]) == ["worker-1", "worker-2"]
        # continuous batching by default: several slots per worker, sized from memory
        slots = {w["slots"] for w in info["workers"]}
        assert all(w["device"] == "cpu" for w in info["workers"])
        assert len(slots) == 1
        assert min(slots) > 1
        # two workers on one machine: each may promise half the free memory, not all of it
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert all(0 < w["memory_budget"] <= total // 2 for w in info["workers"])
        table = haifctl("status").stdout
        assert "orchestrator" in table
        assert "worker-2" in table
        assert f"0/{min(slots)}" in table

        # infer goes through the cluster, and says which worker served it
        served = json.loads(haifctl("infer", "Once upon a time", "-n", "16", "-o", "json").stdout)
        assert served["served_by"] == "cluster"
        assert served["worker"] in ("worker-1", "worker-2")
        assert served["usage"]["completion_tokens"] == 16
        local = json.loads(haifctl("infer", "Once", "-n", "4", "-o", "json", "--local").stdout)
        assert local["served_by"] == "in-process"
        # same seed, same text, either way
        args = ("infer", "Once upon a time", "-n", "20", "--seed", "9", "-o", "json")
        assert (
            json.loads(haifctl(*args).stdout)["text"]
            == json.loads(haifctl(*args, "--local").stdout)["text"]
        )

        # kill -9 a worker: the supervisor restarts it and it joins again
        victim = next(d for d in info["daemons"] if d["name"] == "worker-1")
        os.kill(victim["pid"], signal.SIGKILL)
        end = time.monotonic() + 30
        while True:
            now = status(haifctl)
            worker1 = next(d for d in now["daemons"] if d["name"] == "worker-1")
            ids = sorted(w["worker_id"] for w in now["workers"])
            if (
                worker1["restarts"] == 1
                and worker1["pid"] != victim["pid"]
                and ids == ["worker-1", "worker-2"]
                and worker1["state"] == "running"
            ):
                break
            assert time.monotonic() < end, now
            time.sleep(0.1)

        # while the cluster is up, `models` commands go through the registry daemon
        reg = haifctl("models", "register", str(model_path), "--name", "via-daemon")
        assert reg.returncode == 0, reg.stderr
        listed = json.loads(haifctl("models", "list", "--json").stdout)
        assert "via-daemon" in [m["name"] for m in listed]
        assert haifctl("models", "rm", "via-daemon").returncode == 0
        registry_log = haifctl("logs", "registry", "-n", "500").stdout
        assert " registry     INFO    registry write  op=register " in registry_log
        assert "op=remove" in registry_log
        raw = haifctl("logs", "registry", "-n", "500", "--json").stdout
        assert '"op": "register"' in raw
        assert haifctl("models", "show", "via-daemon").returncode == 2

        logs = haifctl("logs", "worker-1", "-n", "200")
        assert "worker-1     INFO    model loaded" in logs.stdout
        assert haifctl("logs", "nonesuch").returncode == 2
        assert " supervisor   INFO    " in haifctl("logs").stdout

        # SIGTERM drains: a stream under way when `down` starts still completes
        reader = subprocess.Popen(
            [HAIFCTL, "infer", "Once upon a time", "-n", "1900", "--ignore-eos"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "HAIF_HOME": str(home)},
        )
        assert reader.stdout is not None
        assert reader.stdout.read(1)  # streaming has begun
        pids = [d["pid"] for d in status(haifctl)["daemons"]]
        down = haifctl("down")
        rest, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert len(rest.split()) > 600  # the whole 1900-token story arrived
    finally:
        down = haifctl("down")
    assert down.returncode == 0
    assert not any(pid_alive(p) for p in pids)
    stopped = haifctl("status")
    assert stopped.returncode == 3
    assert "no cluster is running" in stopped.stderr
    after = json.loads(haifctl("infer", "Once", "-n", "4", "-o", "json").stdout)
    assert after["served_by"] == "in-process"


def test_up_fails_clearly_for_an_unknown_model(haifctl: Run) -> None:
    proc = haifctl("up", "--model", "ghost", "--bridge-bind", "127.0.0.1:0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown model 'ghost'")
    assert haifctl("status").returncode == 3


def test_gateway_url_must_be_a_zeromq_address(haifctl: Run) -> None:
    proc = haifctl("infer", "x", env={"GATEWAY_URL": "http://localhost:8080"})
    assert proc.returncode == 2
    assert "not a ZeroMQ address" in proc.stderr
    proc = haifctl("infer", "x", "--gateway", "tcp://127.0.0.1:1", "-n", "2")
    assert proc.returncode == 3
    assert "no answer from the gateway" in proc.stderr


def listening_after_two_free_ports() -> socket.socket:
    """A socket listening on a loopback port whose two lower neighbours are free: `up` with
    --metrics-base-port PORT-2 gives the registry and the orchestrator those two, and the
    gateway this one (on a busy machine another process may hold a neighbour)."""

    def free(port: int) -> bool:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for _ in range(50):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        if free(port - 2) and free(port - 1):
            taken.listen()
            return taken
        taken.close()
    raise AssertionError("no port with two free neighbours on 127.0.0.1")


def test_up_reports_the_daemon_that_failed_with_its_log(haifctl: Run, home: Path) -> None:
    with listening_after_two_free_ports() as taken:
        port = taken.getsockname()[1]
        # the gateway (third daemon) gets /metrics on BASE+2: taken, so it fails once started
        # (a busy RPC or HTTP port is refused before anything starts: see the next test)
        proc = haifctl(
            "up",
            "--metrics-base-port",
            str(port - 2),
            "--timeout",
            "60",
            "--bridge-bind",
            "127.0.0.1:0",
        )
    assert proc.returncode == 1
    assert "error: the cluster did not start: gateway failed" in proc.stderr
    assert "gateway| " in proc.stderr  # its last log lines are shown
    assert "Address already in use" in proc.stderr
    assert haifctl("status").returncode == 3
    state = home / "run" / "cluster.json"
    assert not state.exists()


def test_up_checks_its_addresses_before_starting_anything(haifctl: Run, home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (("--bridge-bind", f"127.0.0.1:{port}"), "cannot listen on", "Address already in use"),
            (("--gateway-bind", f"tcp://127.0.0.1:{port}"), "--gateway-bind", "already in use"),
            (("--bridge-bind", "127.0.0.1:notaport"), "--bridge-bind", "0 to 65535"),
            (("--orchestrator-bind", "127.0.0.1:5"), "not tcp://HOST:PORT", ""),
            (("--bridge-bind", "0.0.0.0:0"), "no API keys are configured", "loopback"),
        ]
        for args, said, more in cases:
            proc = haifctl("up", *args)
            assert proc.returncode == 2, (args, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert lines[0].startswith("error:")
            assert said in lines[0]
            assert more in lines[0]
            assert lines[1].startswith("hint:")
            assert len(lines) == 2
    assert not (home / "run" / "cluster.json").exists()
    assert not (home / "logs").exists()  # nothing was started


def test_keys_create_list_revoke(haifctl: Run, home: Path) -> None:
    created = json.loads(haifctl("keys", "create", "--name", "ci", "--json").stdout)
    assert created["key"].startswith("haif-")
    listed = json.loads(haifctl("keys", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["ci"]
    assert "hash" not in listed[0]
    assert created["key"] not in (home / "keys.json").read_text()  # stored hashed
    assert haifctl("keys", "create", "--name", "ci").returncode == 2
    assert "revoked" in haifctl("keys", "revoke", "ci").stdout
    assert json.loads(haifctl("keys", "list", "--json").stdout) == []
    assert haifctl("keys", "revoke", "ci").returncode == 2


def test_faults_under_the_supervisor(haifctl: Run, home: Path) -> None:
    """Under `haifctl up`: a request streaming when the orchestrator is killed (-9) ends with an
    explicit error, not a hang; the supervisor restarts the orchestrator and the cluster serves
    again; a worker drained with SIGTERM (exit 0) is restarted too; `down` then takes seconds."""
    up = haifctl("up", "--workers", "1", "--heartbeat-timeout", "1", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        pids = {d["name"]: d["pid"] for d in status(haifctl)["daemons"]}
        stream = subprocess.Popen(
            [HAIFCTL, "infer", "Once upon a time", "-n", "4000", "--ignore-eos"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert stream.stdout is not None
        stream.stdout.read(1)  # its text has started
        os.kill(pids["orchestrator"], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = stream.communicate(timeout=60)
        assert stream.returncode != 0
        assert "orchestrator" in err, err  # orchestrator_lost: it says what happened
        assert time.monotonic() - killed_at < 10

        def restarted(name: str) -> bool:
            daemon = next(d for d in status(haifctl)["daemons"] if d["name"] == name)
            return daemon["restarts"] >= 1 and daemon["state"] == "running"

        end = time.monotonic() + 60
        while not restarted("orchestrator"):
            assert time.monotonic() < end
            time.sleep(0.1)  # the probe's interval
        end = time.monotonic() + 60
        while (served := haifctl("infer", "Once", "-n", "4")).returncode != 0:
            assert time.monotonic() < end, served.stderr  # workers rejoin within heartbeats
            time.sleep(0.2)

        os.kill(pids["worker-1"], signal.SIGTERM)  # drains, exits 0: still wanted
        end = time.monotonic() + 90
        while not restarted("worker-1"):
            assert time.monotonic() < end
            time.sleep(0.1)
    finally:
        started = time.monotonic()
        down = haifctl("down")
        took = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    assert took < 15, took


def test_a_request_naming_no_model_gets_the_one_up_started(haifctl: Run, model_path: Path) -> None:
    assert haifctl("models", "register", str(model_path), "--name", "other").returncode == 0
    up = haifctl("up", "--model", "other", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        served = json.loads(haifctl("infer", "Once", "-n", "4", "-o", "json").stdout)
        assert served["served_by"] == "cluster"
        assert served["model"] == "other:1"
        info = status(haifctl)
        bridge = next(d["endpoint"] for d in info["daemons"] if d["name"] == "bridge")
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{bridge}/infer",
                data=json.dumps({"prompt": "Once", "params": {"max_tokens": 4}}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=30,
        ) as answer:
            assert json.load(answer)["model"] == "other:1"
    finally:
        assert haifctl("down").returncode == 0
