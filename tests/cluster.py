"""Start real daemon processes on ephemeral loopback ports, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from haifctl import wire
from haifctl.client import ClusterClient
from haifctl.errors import Unavailable
from haifctl.security import ADMIN, WORKER, Keyring

HAIFCTL = str(Path(sys.executable).parent / "haifctl")


class Proc:
    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.ready_file = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        self.log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [HAIFCTL, *args, "--metrics-port", "0", "--ready-file", str(self.ready_file)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 60.0) -> dict[str, object]:
        """Probe the ready file the daemon writes once bound (no fixed sleeps)."""
        end = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}: {self.tail()}")
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name} not ready after {timeout}s: {self.tail()}")
            time.sleep(0.01)  # polling interval of the probe, not a wait for readiness
        info: dict[str, object] = json.loads(self.ready_file.read_text())
        return info

    def endpoint(self) -> str:
        endpoints = self.wait_ready()["endpoints"]
        assert isinstance(endpoints, dict)
        return str(endpoints["rpc"])

    def tail(self, n: int = 30) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def log_events(self) -> list[dict[str, object]]:
        if not self.log.closed:
            self.log.flush()
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.log.closed:
            return self.popen.wait()
        self.kill(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self.log.close()


class Cluster:
    """registry + orchestrator + gateway + N workers, each its own process."""

    def __init__(
        self,
        workdir: Path,
        workers: int = 2,
        heartbeat_timeout: float = 2.0,
        queue_size: int = 64,
        gateway_args: tuple[str, ...] = (),
        bridge_env: dict[str, str] | None = None,
        slots: int = 1,
    ) -> None:
        self.workdir = workdir
        # each cluster has a home of its own, whatever the calling test's environment says;
        # one slot per worker unless a test asks for more (queueing and failover tests count
        # on requests waiting for a slot)
        self.env = {
            **os.environ,
            "HAIF_THREADS": "1",
            "HAIF_SLOTS": str(slots),
            "HAIF_HOME": str(workdir / "home"),
        }
        self.procs: dict[str, Proc] = {}
        self.heartbeat_timeout = heartbeat_timeout
        self.keyring = Keyring.ensure(workdir / "home")  # what `haifctl up` makes first
        registry = self.start("registry", ["daemon", "registry"])
        self.registry = registry.endpoint()
        orch = self.start(
            "orchestrator",
            [
                "daemon",
                "orchestrator",
                "--registry",
                self.registry,
                "--heartbeat-timeout",
                str(heartbeat_timeout),
                "--queue-size",
                str(queue_size),
            ],
        )
        self.orchestrator = orch.endpoint()
        self.gateway_args = [
            "daemon",
            "gateway",
            "--orchestrator",
            self.orchestrator,
            "--heartbeat-timeout",
            str(heartbeat_timeout),
            "--registry",  # where it records usage, as `haifctl up` wires it
            self.registry,
            *gateway_args,
        ]
        gateway = self.start("gateway", self.gateway_args)
        self.gateway = gateway.endpoint()
        self.bridge = ""
        if bridge_env is not None:
            bridge = Proc(
                "bridge",
                ["daemon", "bridge", "--gateway", self.gateway, "--bind", "127.0.0.1:0"],
                workdir,
                {**self.env, **bridge_env},
            )
            self.procs["bridge"] = bridge
            self.bridge = bridge.endpoint()
        for i in range(workers):
            self.start_worker(f"worker-{i + 1}")
        for i in range(workers):
            self.procs[f"worker-{i + 1}"].wait_ready()
        self.wait_workers(workers)

    def start(self, name: str, args: list[str]) -> Proc:
        old = self.procs.get(name)
        if old is not None:
            old.stop()  # reap the previous incarnation (killed or not)
        proc = Proc(name, args, self.workdir, self.env)
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, orchestrator: str | None = None) -> Proc:
        return self.start(
            name,
            [
                "worker",
                "--orchestrator",
                orchestrator or self.orchestrator,
                "--worker-id",
                name,
                "--heartbeat",
                "0.2",
            ],
        )

    def client(self) -> ClusterClient:
        return ClusterClient(self.gateway, self.keyring)

    def dealer(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        role: str = ADMIN,
        identity: bytes = b"",
    ) -> zmq.Socket[bytes]:
        """A hand-made peer holding the cluster's key for ``role``, connected to ``address``
        (under ``identity``, when given)."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        self.keyring.client(sock, role)
        sock.connect(address)
        return sock

    def hand_made_worker(
        self, ctx: zmq.Context[zmq.Socket[bytes]], worker_id: str
    ) -> zmq.Socket[bytes]:
        """A worker played by the test: a DEALER under ``worker_id``, registered with the
        orchestrator (one slot of the shipped model) and acknowledged."""
        worker = self.dealer(ctx, self.orchestrator, WORKER, identity=worker_id.encode())
        register = wire.Register(
            worker_id=worker_id,
            models=["stories260K:1"],
            slots=1,
            device="cpu",
            n_ctx=2048,
            pid=1,
            host="test",
        )
        worker.send(wire.encode(register))
        assert worker.poll(5000), "the orchestrator did not answer the registration"
        assert isinstance(wire.decode(worker.recv()).msg, wire.Ack)
        return worker

    def dispatched(
        self, client: zmq.Socket[bytes], worker: zmq.Socket[bytes], request_id: str
    ) -> wire.Infer:
        """Send a request through the gateway; return it as a hand-made worker receives it."""
        client.send(wire.encode(wire.Infer(request={"prompt": "x"}), request_id))
        while worker.poll(10_000):
            envelope = wire.decode(worker.recv())
            if isinstance(envelope.msg, wire.Infer) and envelope.id == request_id:
                return envelope.msg
        raise AssertionError(f"{request_id} never reached the worker")

    def wait_workers(self, n: int, timeout: float = 60.0, ids: set[str] | None = None) -> None:
        """Probe the orchestrator's worker table until it shows what we expect."""
        end = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    workers = {w.worker_id for w in client.stats().workers}
                except Unavailable:
                    workers = set()
                if len(workers) == n and (ids is None or workers == ids):
                    return
                if time.monotonic() > end:
                    raise TimeoutError(f"expected {n} workers, have {sorted(workers)}")
                time.sleep(0.02)

    def stop(self) -> dict[str, int]:
        codes = {}
        core = ("bridge", "gateway", "orchestrator", "registry")
        for name in [n for n in self.procs if n not in core]:
            codes[name] = self.procs[name].stop()
        for name in ("bridge", "gateway", "orchestrator", "registry"):
            if name in self.procs:
                codes[name] = self.procs[name].stop()
        return codes
