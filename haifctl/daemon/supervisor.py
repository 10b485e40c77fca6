"""The supervisor: starts the cluster's daemons in order, restarts the ones that die (with
backoff), records their state in ``HOME/run/cluster.json`` and drains them on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from haifctl.daemon.base import log
from haifctl.daemon.state import log_dir, remove_state, run_dir, write_state
from haifctl.files import open_log, private_dir, rotate_log, write_run_marker

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a daemon up this long has its backoff reset
ROTATE_EVERY_S = 2.0  # how often the log files' sizes are looked at


@dataclass
class Child:
    name: str
    args: list[str]  # haifctl arguments, without --bind / --ready-file
    bind: str | None  # None: the daemon does not listen (workers)
    endpoint: str = ""
    metrics: str = ""
    pid: int = 0
    state: str = "starting"
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START_S
    next_start: float = 0.0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def share_of_cores(cores: int, workers: int) -> int:
    """llama.cpp threads for each of ``workers`` workers on one machine: the cores less one
    (left to the bridge, the relays and the clients), divided among the workers.  llama.cpp's
    thread pool waits for every thread at each step of a decode, so one thread that loses its
    core to another process stalls them all: on 2 cores, a worker with 2 threads served the
    cluster's first token later and fewer tokens/s than one with 1 (16.9 against 11.9 ms,
    1,591 against 1,967 tok/s).  Capped at 8: past that, token generation on a CPU is bound
    by memory bandwidth, not threads."""
    return max(1, min(8, (cores - 1) // max(1, workers)))


class Supervisor:
    def __init__(
        self,
        home: Path,
        *,
        workers: int,
        models: list[str],
        registry_url: str,
        gateways: int = 1,
        orchestrator_bind: str = "tcp://127.0.0.1:0",
        gateway_bind: str = "tcp://127.0.0.1:0",
        restart: str = "on-failure",
        heartbeat_timeout_s: float = 3.0,
        drain_grace_s: float = 30.0,
        bridge_bind: str | None = "127.0.0.1:8080",
        metrics_base_port: int = 0,
        worker_threads: int = 0,
        log_max_bytes: int = 10_000_000,
        log_keep: int = 3,
        run: float | None = None,
    ) -> None:
        self.metrics_base_port = metrics_base_port
        self.log_max_bytes = log_max_bytes
        self.log_keep = log_keep
        self.next_rotation = 0.0  # monotonic time of the next look at the log files' sizes
        self.home = home
        self.restart = restart
        self.drain_grace_s = drain_grace_s
        self.should_exit = False
        self.ready = False
        self.failed = ""
        self.started_at = time.time()
        self.run_id = run if run is not None else self.started_at  # `up` names it
        self.registry_url = registry_url
        # the registry URL may hold a password: it reaches the daemons through their
        # environment (HAIF_REGISTRY_URL, see child_env), never their command lines, which
        # every user of the machine can read in /proc/PID/cmdline
        common = ["--home", str(home)]
        self.children = [
            Child("registry", [*common, "daemon", "registry"], "tcp://127.0.0.1:0"),
            Child(
                "orchestrator",
                [
                    *common,
                    "daemon",
                    "orchestrator",
                    "--heartbeat-timeout",
                    str(heartbeat_timeout_s),
                ],
                orchestrator_bind,
            ),
        ]
        # Gateways after the first listen on the same host, on ports of their own; the bridge
        # uses the first (it holds one link), clients and other bridges may use any.  With
        # HAIF_REDIS_URL they share their limits; without, each keeps its own.
        for i in range(gateways):
            bind = gateway_bind if i == 0 else gateway_bind.rsplit(":", 1)[0] + ":0"
            self.children.append(
                Child(
                    "gateway" if i == 0 else f"gateway-{i + 1}",
                    [
                        *common,
                        "daemon",
                        "gateway",
                        "--heartbeat-timeout",
                        str(heartbeat_timeout_s),
                    ],
                    bind,
                )
            )
        if bridge_bind is not None:
            self.children.append(Child("bridge", [*common, "daemon", "bridge"], bridge_bind))
        threads = worker_threads or share_of_cores(os.cpu_count() or 1, workers)
        for i in range(workers):
            model = models[i % len(models)]
            self.children.append(
                Child(
                    f"worker-{i + 1}",
                    [
                        *common,
                        "worker",
                        "--model",
                        model,
                        "--worker-id",
                        f"worker-{i + 1}",
                        "--threads",
                        str(threads),
                    ],
                    None,
                )
            )

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # lifecycle -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.should_exit = True

    def run(self) -> int:
        self.install_signal_handlers()
        private_dir(run_dir(self.home))
        private_dir(log_dir(self.home))
        try:
            for child in self.children:
                self.spawn(child)
                if not self.wait_ready(child, timeout=120.0):
                    self.failed = child.name
                    return 1
            self.ready = True
            self.write_state("ready")
            log(
                "supervisor",
                "cluster ready",
                gateway=self.child("gateway").endpoint,
                orchestrator=self.child("orchestrator").endpoint,
            )
            self.serve()
            return 0
        finally:
            self.shutdown()

    def args_for(self, child: Child) -> list[str]:
        args = [sys.executable, "-m", "haifctl", *child.args]
        if child.name == "orchestrator":
            args += ["--registry", self.child("registry").endpoint]
        elif child.name.startswith("worker"):
            args += ["--orchestrator", self.child("orchestrator").endpoint]
        elif child.name.startswith("gateway"):
            args += [
                "--orchestrator",
                self.child("orchestrator").endpoint,
                "--registry",  # where it records usage
                self.child("registry").endpoint,
            ]
        elif child.name == "bridge":
            args += ["--gateway", self.child("gateway").endpoint]
        if child.bind is not None:
            # after the first start, keep the same port so that peers reconnect by themselves
            args += ["--bind", child.endpoint or child.bind]
        # each daemon its own /metrics port: BASE, BASE+1, ... or any free one when BASE is 0
        index = self.children.index(child)
        port = self.metrics_base_port + index if self.metrics_base_port else 0
        args += ["--metrics-port", str(port)]
        return [*args, "--ready-file", str(self.ready_file(child))]

    def child_env(self) -> dict[str, str]:
        """A daemon's environment: ours, plus the settings that must not be on its command
        line.  The environment wins over the config file and loses only to flags."""
        return {**os.environ, "HAIF_REGISTRY_URL": self.registry_url}

    def ready_file(self, child: Child) -> Path:
        return run_dir(self.home) / f"{child.name}.ready"

    def spawn(self, child: Child) -> None:
        self.ready_file(child).unlink(missing_ok=True)
        logfile = open_log(self.log_path(child.name))  # 0600
        try:
            if child.restarts == 0 and child.popen is None:
                write_run_marker(logfile, child.name, self.run_id)
            child.popen = subprocess.Popen(
                self.args_for(child),
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env(),
            )
        finally:
            os.close(logfile)
        child.pid = child.popen.pid
        child.started_at = time.time()
        child.state = "starting"
        log("supervisor", "started", target=child.name, pid=child.pid)

    def wait_ready(self, child: Child, timeout: float) -> bool:
        """Probe the daemon's ready file (written once it has bound its sockets)."""
        end = time.monotonic() + timeout
        path = self.ready_file(child)
        assert child.popen is not None
        while not path.exists():
            if child.popen.poll() is not None or self.should_exit or time.monotonic() > end:
                child.state = "failed"
                log(
                    "supervisor",
                    "daemon failed to start",
                    level="error",
                    target=child.name,
                    returncode=child.popen.poll(),
                )
                return False
            time.sleep(0.02)  # the probe's polling interval
        info = json.loads(path.read_text())
        endpoints = info.get("endpoints", {})
        if child.bind is not None:
            child.endpoint = endpoints.get("rpc", child.endpoint)
        child.metrics = endpoints.get("metrics", "")
        child.state = "running"
        return True

    def serve(self) -> None:
        while not self.should_exit:
            now = time.monotonic()
            changed = False
            for child in self.children:
                assert child.popen is not None
                if child.state == "running" and time.time() - child.started_at > HEALTHY_AFTER_S:
                    child.backoff = BACKOFF_START_S
                if child.state in ("running", "starting") and child.popen.poll() is not None:
                    code = child.popen.returncode
                    log(
                        "supervisor",
                        "daemon exited",
                        level="warning",
                        target=child.name,
                        returncode=code,
                    )
                    # A worker that drained and exited 0 (someone sent it SIGTERM) is still
                    # wanted: only the cluster going down, or --restart never, stops it.
                    clean = code == 0 and not child.name.startswith("worker")
                    if self.restart == "never" or (self.restart == "on-failure" and clean):
                        child.state = "exited"
                    else:
                        child.state = "backoff"
                        child.next_start = now + child.backoff
                        child.backoff = min(BACKOFF_MAX_S, child.backoff * 2)
                    changed = True
                elif child.state == "backoff" and now >= child.next_start:
                    child.restarts += 1
                    self.spawn(child)
                    changed = True
                elif child.state == "starting" and self.ready_file(child).exists():
                    self.wait_ready(child, timeout=0)
                    changed = True
            if changed:
                self.write_state("ready")
            if now >= self.next_rotation:
                self.next_rotation = now + ROTATE_EVERY_S
                self.rotate_logs()
            time.sleep(0.1)  # the supervision loop's tick

    def log_path(self, name: str) -> Path:
        return log_dir(self.home) / f"{name}.log"

    def rotate_logs(self) -> None:
        """Keep each log file under its size: the daemons', and the supervisor's own."""
        for name in ["supervisor", *(c.name for c in self.children)]:
            try:
                if rotate_log(self.log_path(name), self.log_max_bytes, self.log_keep):
                    log("supervisor", "log rotated", target=name, keep=self.log_keep)
            except OSError as exc:
                log("supervisor", "cannot rotate a log", level="warning", target=name, error=exc)

    def shutdown(self) -> None:
        """Drain: the gateway first (it finishes what it has in flight), then the rest."""
        self.write_state("stopping")
        order = [
            [c.name for c in self.children if c.name == "bridge"],  # HTTP first: it drains too
            [c.name for c in self.children if c.name.startswith("gateway")],
            [c.name for c in self.children if c.name.startswith("worker")],
            ["orchestrator"],
            ["registry"],
        ]
        for names in order:
            group = [self.child(n) for n in names]
            for child in group:
                if child.popen is not None and child.popen.poll() is None:
                    child.popen.send_signal(signal.SIGTERM)
            end = time.monotonic() + self.drain_grace_s
            for child in group:
                if child.popen is None:
                    continue
                try:
                    child.popen.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log(
                        "supervisor",
                        "daemon did not drain in time; killing",
                        level="warning",
                        target=child.name,
                    )
                    child.popen.kill()
                    child.popen.wait()
                child.state = "stopped"
        if self.failed:
            self.write_state("failed", failed=self.failed)  # `up` reads it, then removes it
        else:
            remove_state(self.home)
        for child in self.children:
            self.ready_file(child).unlink(missing_ok=True)
        log("supervisor", "cluster stopped")

    def write_state(self, state: str, failed: str = "") -> None:
        data = {
            "state": state,
            "failed": failed,
            "supervisor_pid": os.getpid(),
            "started_at": self.started_at,
            "restart": self.restart,
            "registry_url": self.registry_url,
            "home": str(self.home),
            "daemons": [
                {
                    k: getattr(c, k)
                    for k in (
                        "name",
                        "pid",
                        "endpoint",
                        "metrics",
                        "state",
                        "started_at",
                        "restarts",
                    )
                }
                for c in self.children
            ],
        }
        write_state(self.home, data)
