"""The orchestrator at scale: N simulated workers; scheduling latency, throughput and idle CPU.

    python bench/control_plane.py [--workers 10,100,1000] [--seconds 4] [--rate 500]
                                  [--in-flight 64] [--slots 4]

A real registry and a real orchestrator (`haifctl daemon ...`, each its own process, on loopback
ports, in a temporary home), then N fake workers in one other process: each a DEALER of its own
that speaks as a worker does (haifctl/daemon/worker.py): it registers, heartbeats as often as
the orchestrator's answer says, at its phase of the interval on the wall clock, asks for an
answer only after half its silence limit without a word, registers again when the orchestrator
does not know it, and answers every Infer at once with a Done.  A client DEALER sends Infer
requests as the gateway does.  A fresh orchestrator per N.

    hb s        seconds between heartbeats, as the orchestrator told the workers
    idle %core  the orchestrator's CPU with N workers heartbeating and no requests
    us/hb       that CPU over the heartbeats handled (N / hb s a second, and the few answers);
                at small N mostly the loop's own ticks
    sched us    p50 and p99 of the orchestrator's own scheduling latency in the open loop: from
                its handler taking an Infer to the dispatch to a worker handed to ZeroMQ, read
                from its haif_schedule_seconds histogram before and after the run (interpolated
                within buckets, as Prometheus' histogram_quantile does)
    p50, p99    send -> Done round trip seen by the client, in microseconds, open loop at
                --rate requests/s: three Python processes and two hops each way
    req/s       completed per second, closed loop with --in-flight requests outstanding
    us/req      the orchestrator's CPU per request in that run, its idle CPU taken off
    scrape ms   one GET /metrics on the orchestrator

The client, the fake workers and the orchestrator share this machine's cores, so the round trip
includes two extra hops through Python on each side.  For scale, each N is first run against a
"relay" (--no-relay to skip): the least any orchestrator must do, in Python with pyzmq, with the
same sockets and the same message count (answer a Register with the same heartbeat interval and
a heartbeat only when it asks, pass each Infer to the next worker in turn and each Done back)
and nothing else; its figures are this machine's floor.  Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import IO

import msgspec
import zmq

from haifctl import wire
from haifctl.config import resolve
from haifctl.daemon.orchestrator import HEARTBEATS_PER_TIMEOUT
from haifctl.daemon.worker import HEARTBEAT_PHASES
from haifctl.security import GATEWAY, WORKER, Keyring

HAIFCTL = str(Path(sys.executable).parent / "haifctl")
HEARTBEAT_S = 0.5  # a worker's own interval, until the orchestrator's answer says
ORCHESTRATOR_TIMEOUT_S = 3.0  # a worker's (haifctl worker: max(3, 6 x --heartbeat))
REQUEST = {"prompt": "Once upon a time", "max_tokens": 16}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_LIFETIME_S = 900.0  # a fake-worker process left behind stops by itself
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)  # ints: pyzmq's enums cost microseconds


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all threads, from /proc: each thread's schedstat (nanoseconds;
    /proc/PID/stat counts in ticks of 10 ms, too coarse for 1% of a core over a few seconds)."""
    try:
        return (
            sum(
                int((task / "schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (FileNotFoundError, IndexError, ValueError):  # a thread ended meanwhile; no schedstat
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# fake workers (a process of their own) -----------------------------------------------------------
def fake_workers(address: str, n: int, model: str, slots: int, keys: Keyring) -> None:
    """N workers on N DEALER sockets (CURVE, with the cluster's worker key, as real workers),
    served from one epoll loop; stops when stdin closes."""
    raise_fd_limit(4 * n + 256)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, n + 64)
    selector = selectors.DefaultSelector()
    socks: list[zmq.Socket[bytes]] = []
    registers: list[bytes] = []
    beats: list[tuple[bytes, bytes]] = []  # (without, with) the ask for an answer
    dones: list[wire.Done] = []
    phases: list[list[int]] = [[] for _ in range(HEARTBEAT_PHASES)]  # workers by phase
    for i in range(n):
        worker_id = f"fake-{i}"
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}/{uuid.uuid4().hex[:8]}".encode())
        keys.client(sock, WORKER)
        sock.connect(address)
        socks.append(sock)
        selector.register(sock.fileno(), selectors.EVENT_READ, i)
        registers.append(
            wire.encode(
                wire.Register(
                    worker_id=worker_id,
                    models=[model],
                    slots=slots,
                    device="cpu",
                    n_ctx=512,
                    pid=os.getpid(),
                    host="bench",
                )
            )
        )
        heartbeat = wire.Heartbeat(worker_id=worker_id, busy=0, served=0, errors=0, tokens=0)
        beats.append(
            (
                wire.encode(msgspec.structs.replace(heartbeat, ack=False)),
                wire.encode(msgspec.structs.replace(heartbeat, ack=True)),
            )
        )
        phases[zlib.crc32(worker_id.encode()) % HEARTBEAT_PHASES].append(i)
        dones.append(
            wire.Done(
                finish_reason="stop",
                prompt_tokens=5,
                completion_tokens=16,
                model=model,
                worker=worker_id,
                time_to_first_token_ms=0.0,
                generation_ms=0.0,
            )
        )
    known = [False] * n
    heard = [0.0] * n  # when each last heard from the orchestrator (monotonic)
    registered = [0.0] * n
    interval = [HEARTBEAT_S]  # as the orchestrator's answer to a Register says
    told: list[bool] = []
    for i, (sock, body) in enumerate(zip(socks, registers, strict=True)):
        sock.send(body)
        registered[i] = time.monotonic()

    def silence_limit() -> float:
        return max(ORCHESTRATOR_TIMEOUT_S, 6 * interval[0])

    def serve(i: int) -> None:
        sock = socks[i]
        # The FD is edge-triggered: read until empty, and again whenever sending may have
        # swallowed the edge of a message that came in meanwhile.
        while sock.poll(0, zmq.POLLIN):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope = wire.decode(frame)
            msg = envelope.msg
            now = heard[i] = time.monotonic()
            if isinstance(msg, wire.Infer):
                sock.send(wire.reply(envelope, dones[i]))
            elif isinstance(msg, wire.Ack):
                known[i] = msg.known
                if msg.heartbeat_s > 0 and (msg.heartbeat_s != interval[0] or not told):
                    interval[0] = msg.heartbeat_s
                    told.append(True)
                    print(f"heartbeat {msg.heartbeat_s}", flush=True)  # for the bench
                if not msg.known and now - registered[i] > 0.5:
                    sock.send(registers[i])
                    registered[i] = now

    def beat(i: int) -> None:
        ask = not known[i] or time.monotonic() - heard[i] >= silence_limit() / 2
        socks[i].send(beats[i][ask])
        serve(i)

    stdin_fd = sys.stdin.fileno()
    selector.register(stdin_fd, selectors.EVENT_READ, -1)
    print("ready", flush=True)
    started = time.monotonic()
    # Each phase's workers heartbeat at its instants of the wall clock, as workers do: phase
    # instant number k is at k * interval / HEARTBEAT_PHASES seconds of Unix time.
    width = interval[0] / HEARTBEAT_PHASES
    step = int(time.time() // width)  # the last phase instant passed
    while time.monotonic() - started < MAX_LIFETIME_S:
        for key, _ in selector.select(min(0.01, max(0.0, (step + 1) * width - time.time()))):
            if key.data == -1:
                if not os.read(stdin_fd, 4096):  # the bench closed our stdin: stop
                    ctx.destroy(linger=0)
                    return
                continue
            serve(key.data)
        if width != interval[0] / HEARTBEAT_PHASES:  # told another interval: start over
            width = interval[0] / HEARTBEAT_PHASES
            step = int(time.time() // width)
        now_step = int(time.time() // width)
        step = max(step, now_step - HEARTBEAT_PHASES)  # after a stall, one round at most
        while step < now_step:
            step += 1
            for i in phases[step % HEARTBEAT_PHASES]:
                beat(i)
    ctx.destroy(linger=0)


# the floor (a process of its own) ---------------------------------------------------------------
def relay(ready_file: Path) -> None:
    """Ack heartbeats, pass each Infer to the next worker and each Done back; until SIGTERM."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.RCVHWM, 100_000)
    # CURVE as the orchestrator's socket has it (the cluster's keys, from HAIF_HOME), so the floor
    # pays for the encryption too
    Keyring.ensure(Path(os.environ["HAIF_HOME"])).server(router, "orchestrator")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    tmp = ready_file.with_suffix(".tmp")  # written whole, then renamed: never read half-written
    tmp.write_text(json.dumps({"endpoints": {"rpc": f"tcp://127.0.0.1:{port}"}}))
    tmp.replace(ready_file)
    ack = wire.encode(wire.Ack(known=True))
    # the interval an orchestrator with the default timeout tells its workers
    welcome = wire.encode(
        wire.Ack(known=True, heartbeat_s=resolve().heartbeat_timeout / HEARTBEATS_PER_TIMEOUT)
    )
    workers: list[bytes] = []
    clients: dict[str, bytes] = {}
    turn = 0
    started = time.monotonic()
    while not stopping and time.monotonic() - started < MAX_LIFETIME_S:
        if not router.poll(50):
            continue
        while True:
            try:
                identity = router.recv(NOBLOCK)
                body = router.recv(NOBLOCK)
            except zmq.Again:
                break
            envelope = wire.decode(body)
            msg = envelope.msg
            to, answer = identity, ack
            if isinstance(msg, wire.Heartbeat):
                if not msg.ack:
                    continue
            elif isinstance(msg, wire.Infer):
                clients[envelope.id] = identity
                to, answer = workers[turn % len(workers)], body
                turn += 1
            elif isinstance(msg, wire.Done):
                to, answer = clients.pop(envelope.id), body
            elif isinstance(msg, wire.Register):
                workers.append(identity)
                answer = welcome
            elif isinstance(msg, wire.ResolveModel):
                answer = wire.reply(
                    envelope, wire.ModelInfo(ref=msg.ref, path="", context_length=0)
                )
            elif isinstance(msg, wire.StatsRequest):
                stats = wire.Stats(daemon="relay", counters={"workers": len(workers)})
                answer = wire.reply(envelope, stats)
            router.send(to, NOBLOCK | SNDMORE)
            router.send(answer, NOBLOCK)
    ctx.destroy(linger=0)


# daemons -----------------------------------------------------------------------------------------
def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:  # 503 (HTTPError) while not ready, or not listening yet
        return False


class Daemon:
    def __init__(self, name: str, argv: list[str], home: Path, env: dict[str, str]) -> None:
        self.ready = home / f"{name}.ready"
        self.log: IO[bytes] = (home / f"{name}.log").open("ab")
        self.popen = subprocess.Popen(
            [*argv, "--ready-file", str(self.ready)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        end = time.monotonic() + 60
        while not self.ready.exists():  # probe the ready file the daemon writes once bound
            if self.popen.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{name} did not start: see {home / (name + '.log')}")
            time.sleep(0.01)
        self.endpoints: dict[str, str] = json.loads(self.ready.read_text())["endpoints"]
        if "metrics" in self.endpoints:  # then its /readyz: the orchestrator's registry link up
            readyz = self.endpoints["metrics"].removesuffix("/metrics") + "/readyz"
            while not ready(readyz):
                if self.popen.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{name} never ready: see {home / (name + '.log')}")
                time.sleep(0.01)

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.log.close()
        self.ready.unlink(missing_ok=True)


# the client (the gateway's side of the link) ----------------------------------------------------
class Client:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        keys: Keyring,
        role: str = GATEWAY,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        keys.client(self.sock, role)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(address)
        self.infer = wire.Infer(request=REQUEST, client="bench")
        self.prefix = uuid.uuid4().hex[:8]
        self.seq = 0
        self.sent: dict[str, float] = {}
        self.errors: dict[str, int] = {}

    def call(self, msg: wire.Msg, timeout: float = 10.0) -> wire.Msg:
        request_id = wire.new_id()
        self.sock.send(wire.encode(msg, request_id))
        end = time.monotonic() + timeout
        while self.sock.poll(max(1, int((end - time.monotonic()) * 1000))):
            envelope = wire.decode(self.sock.recv())
            if envelope.id == request_id:
                return envelope.msg
        raise TimeoutError(f"no answer to {type(msg).__name__}")

    def wait_workers(self, n: int, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while True:
            stats = self.call(wire.StatsRequest())
            assert isinstance(stats, wire.Stats)
            registered = len(stats.workers) or stats.counters.get("workers", 0)
            if registered >= n:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"{registered} of {n} workers registered")
            time.sleep(0.05)  # polling interval of the probe

    def send(self) -> None:
        self.seq += 1
        request_id = f"{self.prefix}-{self.seq}"
        deadline = time.time() + 60
        self.sent[request_id] = time.perf_counter()
        self.sock.send(wire.encode(self.infer, request_id, deadline))

    def receive(self, latencies: list[float]) -> int:
        """Take every answer waiting; returns how many requests ended."""
        ended = 0
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return ended
            now = time.perf_counter()
            envelope = wire.decode(frame)
            started = self.sent.pop(envelope.id, None)
            if started is None:
                continue
            ended += 1
            if isinstance(envelope.msg, wire.Done):
                latencies.append(now - started)
            else:
                code = getattr(envelope.msg, "code", type(envelope.msg).__name__)
                self.errors[code] = self.errors.get(code, 0) + 1

    def settle(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.sent and time.monotonic() < end:
            if self.sock.poll(50):
                self.receive([])
        self.sent.clear()

    def closed_loop(self, seconds: float, in_flight: int) -> int:
        """Keep ``in_flight`` requests outstanding; returns how many completed."""
        done: list[float] = []
        for _ in range(in_flight):
            self.send()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if self.sock.poll(100):
                self.receive(done)
                while len(self.sent) < in_flight:
                    self.send()
        completed = len(done)
        self.settle()
        return completed

    def open_loop(self, seconds: float, rate: float) -> list[float]:
        """Send at a fixed rate whatever comes back; returns send -> Done latencies."""
        latencies: list[float] = []
        start = time.perf_counter()
        total = int(seconds * rate)
        sent = 0
        while sent < total:
            now = time.perf_counter()
            while sent < total and start + sent / rate <= now:
                self.send()
                sent += 1
            wait = start + sent / rate - time.perf_counter()
            if self.sock.poll(max(0, int(wait * 1000))):
                self.receive(latencies)
        end = time.monotonic() + 10
        while self.sent and time.monotonic() < end:
            if self.sock.poll(50):
                self.receive(latencies)
        self.sent.clear()
        return latencies


def pace_us() -> float:
    """How fast Python runs here now: figures from a busy or slow machine scale with this."""
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def schedule_buckets(url: str) -> dict[float, float]:
    """The orchestrator's haif_schedule_seconds histogram: upper bound -> cumulative count."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("haif_schedule_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """The q-quantile of what a cumulative histogram counted between two reads, interpolated
    linearly within its bucket (Prometheus' histogram_quantile); NaN when it counted nothing."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def scrape_ms(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    return (time.perf_counter() - start) * 1000


def run(
    n: int, args: argparse.Namespace, target: str, registry: str, home: Path, env: dict[str, str]
) -> None:
    if target == "relay":
        orch = Daemon("relay", [sys.executable, __file__, "--relay"], home, env)
    else:
        daemon = ["daemon", "orchestrator", "--registry", registry, "--queue-size", "100000"]
        orch = Daemon(target, [HAIFCTL, *daemon, "--metrics-port", "0"], home, env)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    fake: subprocess.Popen[bytes] | None = None
    try:
        keys = Keyring.ensure(Path(env["HAIF_HOME"]))
        client = Client(ctx, orch.endpoints["rpc"], keys)
        # what the fake workers serve, resolved as a worker resolves its model (a gateway may not)
        info = Client(ctx, orch.endpoints["rpc"], keys, WORKER).call(
            wire.ResolveModel(ref=args.model)
        )
        assert isinstance(info, wire.ModelInfo), info
        fake = subprocess.Popen(
            [
                sys.executable,
                __file__,
                *("--fake-workers", str(n), "--orchestrator", orch.endpoints["rpc"]),
                *("--model", info.ref, "--slots", str(args.slots)),
                *("--keys", env["HAIF_HOME"]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert fake.stdout is not None
        if fake.stdout.readline().strip() != b"ready":
            raise RuntimeError("the fake workers did not start")
        client.wait_workers(n)
        # b"heartbeat SECONDS": what the first answer to a Register told them
        told = fake.stdout.readline().split()
        interval = float(told[1]) if told[:1] == [b"heartbeat"] else HEARTBEAT_S
        client.closed_loop(1.0, args.in_flight)  # warm up
        client.errors.clear()
        pid = orch.popen.pid

        time.sleep(1.0)  # let the warm-up's tail pass before measuring idle
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.seconds)
        idle = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)

        metrics = orch.endpoints.get("metrics")
        before = schedule_buckets(metrics) if metrics else {}
        latencies = client.open_loop(args.seconds, args.rate)
        after = schedule_buckets(metrics) if metrics else {}
        sched = [histogram_quantile(q, before, after) * 1e6 for q in (0.5, 0.99)]

        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        completed = client.closed_loop(args.seconds, args.in_flight)
        elapsed = time.monotonic() - t0
        busy = cpu_seconds(pid) - cpu0
        scrape = "-"
        if "metrics" in orch.endpoints:
            scrape = f"{min(scrape_ms(orch.endpoints['metrics']) for _ in range(3)):.1f}"
        errors = ", ".join(f"{k} {v}" for k, v in client.errors.items()) or "-"
        sched_us = "-" if not after else f"{sched[0]:,.0f} / {sched[1]:,.0f}"
        print(
            f"{target:<12} {n:>7,} {interval:>5g} {idle * 100:>10.1f}"
            f" {idle / (n / interval) * 1e6:>7.1f} {sched_us:>13}"
            f" {percentile(latencies, 0.5) * 1e6:>8,.0f} {percentile(latencies, 0.99) * 1e6:>8,.0f}"
            f" {completed / args.seconds:>8,.0f} {(busy - idle * elapsed) / completed * 1e6:>7,.1f}"
            f" {scrape:>10}  {errors}",
            flush=True,
        )
    finally:
        if fake is not None:
            assert fake.stdin is not None
            fake.stdin.close()
            try:
                fake.wait(30)
            except subprocess.TimeoutExpired:
                fake.kill()
                fake.wait()
        ctx.destroy(linger=0)
        orch.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="10,100,1000", help="comma-separated Ns")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s")
    parser.add_argument("--in-flight", type=int, default=64, help="closed-loop concurrency")
    parser.add_argument("--slots", type=int, default=4, help="slots per fake worker")
    parser.add_argument("--model", default="stories260K", help="the model the workers serve")
    parser.add_argument(
        "--no-relay", action="store_true", help="skip the reference relay (the floor)"
    )
    parser.add_argument("--fake-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--orchestrator", help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_workers is not None:
        keys = Keyring.ensure(args.keys)
        return fake_workers(args.orchestrator, args.fake_workers, args.model, args.slots, keys)
    if args.relay:
        return relay(args.ready_file)

    sizes = [int(s) for s in args.workers.split(",")]
    raise_fd_limit(4 * max(sizes) + 256)  # the orchestrator inherits it
    print(
        f"{args.seconds:g} s per phase; open loop at {args.rate:g} req/s; closed loop with "
        f"{args.in_flight} in flight; {args.slots} slots per worker"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"sum(range(1000)) in {pace_us():.1f} us (about 10 on an idle modern core)"
    )
    print(f"{'':<12} {'':>7} {'':>5} {'':>10} {'':>7} {'sched us':>13} {'round trip us':>17}")
    print(
        f"{'':<12} {'workers':>7} {'hb s':>5} {'idle %core':>10} {'us/hb':>7}"
        f" {'p50 / p99':>13} {'p50':>8} {'p99':>8} {'req/s':>8} {'us/req':>7} {'scrape ms':>10}"
        "  errors"
    )
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {**os.environ, "HAIF_HOME": str(home / "home")}
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            env.pop(name, None)
        registry = Daemon(
            "registry", [HAIFCTL, "daemon", "registry", "--metrics-port", "0"], home, env
        )
        try:
            for n in sizes:
                for target in ("orchestrator",) if args.no_relay else ("relay", "orchestrator"):
                    run(n, args, target, registry.endpoints["rpc"], home, env)
        finally:
            registry.stop()


if __name__ == "__main__":
    main()
