"""The supervisor: starts the cluster's daemons in order, restarts the ones that die (with
backoff), records their state in ``HOME/run/cluster.json`` and drains them on SIGTERM.

It also scales the workers while the cluster runs.  `haifctl scale` (or `haifctl up --workers N`
on a running cluster) writes the new target to ``HOME/run/scale.json`` and sends SIGUSR1; the
supervisor reads it on its next tick, starts workers or drains the ones it retires, and
acknowledges in ``cluster.json``.  The request goes through the supervisor, rather than the CLI
starting and stopping workers itself, because only the workers' parent can wait for them: a
worker the CLI started would be nobody's to restart, and one the CLI stopped would be restarted
by the supervisor, which would not know it had been retired.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haifctl.daemon.base import log
from haifctl.daemon.state import (
    SCALE_PROTOCOL,
    log_dir,
    read_scale_request,
    remove_state,
    run_dir,
    write_state,
)
from haifctl.files import open_log, private_dir, rotate_log, write_run_marker

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a daemon up this long has its backoff reset
ROTATE_EVERY_S = 2.0  # how often the log files' sizes are looked at
RETIRE_MARGIN_S = 15.0  # past its own drain grace, a retiring worker is killed
RETIRED_KEPT = 32  # retired workers that cluster.json remembers (the newest)


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
    slot: int = 0  # its place for --metrics-base-port: BASE + slot, kept while it lives
    model: str = ""  # a worker's model
    retire_by: float | None = None  # monotonic deadline once it is being retired


def plan_scale(
    workers: list[tuple[str, str, int]], models: list[str], target: int
) -> tuple[list[str], list[str]]:
    """How to go from ``workers`` (name, model, busy: -1 for one not serving yet) to ``target``
    workers: the models of the workers to add, and the names of the workers to retire.

    The workers keep taking turns over ``models``, as `haifctl up` assigned them, so each model
    keeps its share (no model loses its last worker to a scale-down that could have retired
    another).  Within a model, the least busy workers retire, the newest first on a tie."""
    quota = Counter(models[i % len(models)] for i in range(target))
    have = Counter(model for _, model, _ in workers)
    retire: list[str] = []
    for model in have:
        excess = have[model] - quota[model]
        if excess > 0:
            mine = [(busy, -number(name), name) for name, m, busy in workers if m == model]
            retire += [name for _, _, name in sorted(mine)[:excess]]
    add: list[str] = []
    for i in range(target):
        model = models[i % len(models)]
        if have[model] < quota[model]:
            have[model] += 1
            add.append(model)
    return add, retire


def _busy(reported: object, state: str) -> int:
    """A worker's streams as the request says (-1 for one not serving yet: it goes first)."""
    if state != "running":
        return -1
    return reported if isinstance(reported, int) and not isinstance(reported, bool) else 0


def number(name: str) -> int:
    """A worker's number: 3 for worker-3."""
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def share_of_cores(cores: int, workers: int) -> int:
    """llama.cpp threads for each of ``workers`` workers on one machine: the cores less one
    (left to the bridge, the relays and the clients), divided among the workers.  llama.cpp's
    thread pool waits for every thread at each step of a decode, so one thread that loses its
    core to another process stalls them all: on 2 cores, a worker with 2 threads served the
    cluster's first token later and fewer tokens/s than one with 1 (16.9 against 11.9 ms,
    1,591 against 1,967 tok/s).  Capped at 8: past that, token generation on a CPU is bound
    by memory bandwidth, not threads."""
    return max(1, min(8, (cores - 1) // max(1, workers)))


def prompt_share_of_cores(cores: int, workers: int) -> int:
    """llama.cpp threads for the steps that feed prompts: every core, divided among the workers.
    A prompt is compute-bound and, when one arrives alone, the relays wait for its first token
    rather than compete for a core; on 2 cores with llama.cpp's threads sleeping soon after
    each step (runtime.llamacpp.OMP_SPIN_COUNT), the cluster's first token at one stream came
    in 12.8 ms with 2 such threads against 19.2 with 1 (bench/RESULTS.md)."""
    return max(1, cores // max(1, workers))


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
        worker_threads_batch: int = 0,
        worker_memory: str = "",
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
        self.models = models
        self.worker_threads = worker_threads  # 0: a share of the cores
        self.worker_threads_batch = worker_threads_batch
        self.worker_memory = worker_memory  # "": each worker an equal share of what is free
        self.workers_target = workers
        self.scale_requested = False  # SIGUSR1: read HOME/run/scale.json
        self.scale_ack: dict[str, Any] = {}  # the last scale request's outcome, for the CLI
        self.retired: list[dict[str, Any]] = []
        self.marked: set[str] = set()  # the logs that have this run's marker
        # what cluster.json records of the command line, so that `haifctl up` on a running
        # cluster can say which of its flags differ from what runs
        self.config: dict[str, Any] = {
            "models": models,
            "gateways": gateways,
            "orchestrator_bind": orchestrator_bind,
            "gateway_bind": gateway_bind,
            "restart": restart,
            "heartbeat_timeout": heartbeat_timeout_s,
            "bridge_bind": bridge_bind,
            "metrics_base_port": metrics_base_port,
            "worker_threads": worker_threads,
        }
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
        # holds a link to each and spreads its requests over them, clients may use any.  With
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
        for i, child in enumerate(self.children):
            child.slot = i
        threads = self.threads_for(workers)
        for i in range(workers):
            self.children.append(self.new_worker(models[i % len(models)], threads, workers))

    def threads_for(self, workers: int) -> tuple[int, int]:
        """Each of ``workers`` workers' llama.cpp threads: for generation, and for prompts (0:
        the same).  Unless the user chose: the shares of the cores above; a user who set the
        threads alone gets that many for prompts too, as llama.cpp would."""
        cores = os.cpu_count() or 1
        if self.worker_threads_batch or self.worker_threads:
            return self.worker_threads or share_of_cores(cores, workers), self.worker_threads_batch
        threads = share_of_cores(cores, workers)
        prompts = prompt_share_of_cores(cores, workers)
        return threads, prompts if prompts > threads else 0

    def new_worker(self, model: str, threads: tuple[int, int], workers: int) -> Child:
        """A worker with the lowest free number and the lowest free metrics slot, one of
        ``workers`` on this machine: unless the user set a budget, its models may take that
        share of the memory free when it starts (each counting all of it, two workers
        loading on demand would promise the same memory twice)."""
        names = {c.name for c in self.children}
        slots = {c.slot for c in self.children}
        n = next(i for i in range(1, len(names) + 2) if f"worker-{i}" not in names)
        name = f"worker-{n}"
        args = ["--home", str(self.home), "worker", "--model", model, "--worker-id", name]
        flags = ["--threads", str(threads[0])]
        if threads[1]:
            flags += ["--threads-batch", str(threads[1])]
        if not self.worker_memory:
            flags += ["--memory", f"{100 / max(1, workers):.6g}%"]
        child = Child(name, [*args, *flags], None, model=model)
        child.slot = next(i for i in range(len(slots) + 1) if i not in slots)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # lifecycle -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_scale)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.should_exit = True

    def _on_scale(self, signum: int, frame: object) -> None:
        self.scale_requested = True

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
        elif child.name == "bridge":  # every gateway: requests take turns over them
            gateways = [c.endpoint for c in self.children if c.name.startswith("gateway")]
            args += ["--gateway", ",".join(g for g in gateways if g)]
        if child.bind is not None:
            # after the first start, keep the same port so that peers reconnect by themselves
            args += ["--bind", child.endpoint or child.bind]
        # each daemon its own /metrics port: BASE, BASE+1, ... or any free one when BASE is 0
        port = self.metrics_base_port + child.slot if self.metrics_base_port else 0
        args += ["--metrics-port", str(port)]
        return [*args, "--ready-file", str(self.ready_file(child))]

    def child_env(self) -> dict[str, str]:
        """A daemon's environment: ours, plus the settings that must not be on its command
        line, and the cluster's first model as every daemon's default (what a request that
        names none gets).  The environment wins over the config file and loses only to
        flags."""
        return {**os.environ, "HAIF_REGISTRY_URL": self.registry_url, "HAIF_MODEL": self.models[0]}

    def ready_file(self, child: Child) -> Path:
        return run_dir(self.home) / f"{child.name}.ready"

    def spawn(self, child: Child) -> None:
        self.ready_file(child).unlink(missing_ok=True)
        logfile = open_log(self.log_path(child.name))  # 0600
        try:
            if child.name not in self.marked:  # a worker added later may reuse a name
                self.marked.add(child.name)
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
            if self.scale_requested:
                self.scale_requested = False
                self.scale()
                changed = True
            for child in list(self.children):
                assert child.popen is not None
                if child.retire_by is not None:
                    changed |= self.watch_retiring(child, now)
                    continue
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

    # live scaling ------------------------------------------------------------------------------
    def scale(self) -> None:
        """Read the scale request and start or retire workers to meet it; the CLI waits for
        the acknowledgement (its id) in cluster.json."""
        request = read_scale_request(self.home)
        if request is None:
            log("supervisor", "scale signal without a readable request", level="warning")
            return
        rid = str(request.get("id", ""))
        target = request.get("workers")
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            self.scale_ack = {"id": rid, "error": f"workers must be 1 or more, not {target!r}"}
            return
        raw = request.get("busy")
        busy = raw if isinstance(raw, dict) else {}
        serving = [c for c in self.children if c.name.startswith("worker") and c.retire_by is None]
        was = len(serving)
        load = [(c.name, c.model, _busy(busy.get(c.name), c.state)) for c in serving]
        add, retire = plan_scale(load, self.models, target)
        # new workers get a share of the cores for the new count; the running ones keep theirs
        threads = self.threads_for(target)
        added = []
        for model in add:
            child = self.new_worker(model, threads, target)
            self.children.append(child)
            self.spawn(child)
            added.append(child.name)
        for name in retire:
            self.retire(self.child(name))
        self.workers_target = target
        self.scale_ack = {"id": rid, "workers": target, "added": added, "retiring": retire}
        log("supervisor", "scaling", workers=target, was=was, added=added, retiring=retire)

    def retire(self, child: Child) -> None:
        """Drain a worker for good: it finishes its streams (the orchestrator sends it nothing
        new once it says it is draining), exits, and is not started again."""
        child.retire_by = time.monotonic() + self.drain_grace_s + RETIRE_MARGIN_S
        if child.popen is not None and child.popen.poll() is None:
            child.popen.send_signal(signal.SIGTERM)
            child.state = "draining"

    def watch_retiring(self, child: Child, now: float) -> bool:
        """True once the retiring ``child`` is gone (it exited, or was killed past its time)."""
        assert child.popen is not None
        assert child.retire_by is not None
        code = child.popen.poll()
        if code is None and now > child.retire_by:
            log("supervisor", "retiring worker did not drain in time; killing", target=child.name)
            child.popen.kill()
            code = child.popen.wait()
        if code is None:
            return False
        self.children.remove(child)
        self.ready_file(child).unlink(missing_ok=True)
        exited = {"name": child.name, "pid": child.pid, "returncode": code, "at": time.time()}
        self.retired = [*self.retired, exited][-RETIRED_KEPT:]
        log("supervisor", "worker retired", target=child.name, returncode=code)
        return True

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
                # a retiring worker is draining already: a second SIGTERM would cut it short
                if (
                    child.retire_by is None
                    and child.popen is not None
                    and child.popen.poll() is None
                ):
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
            "scale_protocol": SCALE_PROTOCOL,  # this supervisor reads scale requests
            "workers_target": self.workers_target,
            "config": self.config,
            "scale": self.scale_ack,
            "retired": self.retired,
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
