"""The worker daemon: loads models, joins an orchestrator, runs requests, streams tokens.

No thread per request.  The main loop owns the orchestrator link: it validates requests, renders
and tokenises their prompts and hands them to the model's engine, relays cancels, heartbeats,
re-registers when the orchestrator forgets it or falls silent (on the same connection, under
the same identity, reporting what it still runs), and drains on SIGTERM.  The engine thread decodes
every running sequence together and, once per step, hands all their events to :meth:`on_step`,
which turns them into one stream frame per destination (coalesced for at most
``stream_interval_s``; a first token and a stream's end go out at once) and the final Done or
Error of each finished request.  The engine thread sends them itself, on a link of its own to
the orchestrator (a DEALER named after the worker: ``worker id NUL n``), without waiting (a
frame that finds no room is dropped and counted); the main loop hears over an inproc socket
only that a request ended.  So a token never waits for the main loop, and heartbeats never
wait for the engine.

Requests that generate nothing (their ``op``) hold a slot too, briefly: tokenize and detokenize
are answered on the main loop (a tokeniser call); embeddings, when the worker loaded the model
with them (``--embeddings``), run one request at a time on one embedding thread, which owns the
model's embedding context and hands its answers to the main loop as the engine does.

A worker holds several models, each with its own engine: the one it starts with, and those the
orchestrator tells it to load (:class:`wire.Load`) or unload.  Loads and unloads run one at a
time on a loader thread, so the loop (and its heartbeats) never waits for a model to come off
disk; when one is in (or out) the worker announces its models again.  It never loads more than
its memory budget (``--memory``, or what was free when it started) holds.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket as pysocket
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import zmq

from haifctl import wire
from haifctl.config import Settings
from haifctl.daemon.base import Daemon, incoming, log, socket
from haifctl.errors import HaifError, InvalidInput, Kind, Unavailable
from haifctl.generation import Generation, load_model, looks_like_path, model_at, render_prompt
from haifctl.hashing import sha256_file
from haifctl.placement import estimate_bytes, human_bytes
from haifctl.rpc import RpcClient
from haifctl.runtime.base import SamplingParams, TokenEvent
from haifctl.runtime.engine import Job, LoadedModel, Step, deliver_to_queues
from haifctl.runtime.llamacpp import available_memory, gpu_backend, nvidia_smi
from haifctl.schema import (
    DetokenizeRequest,
    EmbedRequest,
    TokenizeRequest,
    validate_any,
    validate_request,
)
from haifctl.security import WORKER

STREAM_INTERVAL_S = 0.02  # text of a running stream waits at most this long to be sent
# Heartbeats go out at instants of the wall clock: each worker in one of this many phases of
# the interval (by its id), so an orchestrator reads the heartbeats of a phase together, in a
# few wake-ups, rather than waking once per worker.  Fewer phases make bigger bursts, which
# delay the requests that arrive behind them (at 1,000 workers, 20 phases of 50 tripled the
# bench's round-trip p99, 100 of 10 left it as it was); more make more wake-ups (100 phases cost
# 0.4-1.0% of a core more than 50, idle, on 2 shared cores).
HEARTBEAT_PHASES = 50

# What the main loop hears on its inproc socket, by the first frame: FINAL and a request id (an
# engine's request ended; the engine sent its Done itself) or FINAL, id and the answer to
# forward (the embedding thread's); LOADER: the loader thread finished a task (its outcome
# waits in a queue).
FINAL, LOADER = b"F", b"L"
LINK_LINGER_MS = 1000  # how long a closing engine link may take to send what it holds
DRAIN_ID = "drain"  # the heartbeat that says we drain asks for an answer under this id
DRAIN_ACK_S = 1.0  # how long a draining worker with nothing left waits for that answer


class Stream:
    """One request on this worker; the engine job's tag.  Touched only by the engine thread
    once submitted, except ``job.cancel``."""

    __slots__ = (
        "envelope",
        "gen",
        "held",
        "job",
        "logprobs",
        "n_pending",
        "pending",
        "route",
        "started_ns",
    )

    def __init__(self, envelope: wire.Envelope, route: tuple[bytes, ...], held: Held) -> None:
        self.envelope = envelope
        self.route = route
        self.held = held
        self.gen = Generation(held.ref, keep_text=False)  # the clock: first token, end
        self.started_ns = time.time_ns()
        self.pending: list[str] = []
        self.n_pending = 0
        self.logprobs: list[wire.TokenLogprob] = []  # pending, when the request asked for them
        self.job: Job | None = None


class Held:
    """A model this worker has loaded: its engine, what it takes in memory, and how many of
    this worker's requests run on it.  Touched by the main loop only (``streams``)."""

    __slots__ = ("info", "loaded", "relay", "state", "streams", "unloading")

    def __init__(
        self, info: wire.ModelInfo, loaded: LoadedModel, relay: Relay, state: wire.ModelState
    ) -> None:
        self.info = info
        self.loaded = loaded
        self.relay = relay
        self.state = state
        self.streams = 0
        self.unloading = False  # unloaded while requests ran: closed when the last one ends

    @property
    def ref(self) -> str:
        return self.info.ref


class Outbox:
    """Streams with unsent text bound for one destination; flushed together."""

    __slots__ = ("due", "route", "streams")

    def __init__(self, route: tuple[bytes, ...]) -> None:
        self.route = route
        self.streams: list[Stream] = []
        self.due = 0.0


class Relay:
    """One model's engine thread's side of the worker: it turns each engine step into stream
    frames and sends them to the orchestrator on its own link, and tells the main loop which
    requests ended.  Its state is touched by that engine thread only (each engine has its own
    sockets: ZeroMQ sockets are not shared between threads)."""

    def __init__(self, worker: WorkerDaemon, link_id: bytes) -> None:
        self.worker = worker
        self.link_id = link_id  # the link's name at the orchestrator
        # (to the orchestrator, to the main loop): opened by the first step with a frame to send
        self._sockets: tuple[zmq.Socket[bytes], zmq.Socket[bytes]] | None = None
        self._linked_to = ""  # the orchestrator instance the link is named after
        self._outboxes: dict[tuple[bytes, ...], Outbox] = {}
        self._dirty: list[Outbox] = []

    def close(self) -> None:
        """After the engine thread has stopped.  What the link still holds (the last Done of
        a drained request) gets a moment to leave."""
        if self._sockets is not None:
            link, ends = self._sockets
            link.close(linger=LINK_LINGER_MS)
            ends.close(linger=0)
            self._sockets = None

    def open(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        """The link to the orchestrator (under the worker's keys and role) and the socket to
        the main loop, made on the engine thread the first time a request produces events;
        the link made again when the worker has registered with another orchestrator
        instance.  The link is named after the instance the worker registered with: what the
        old link still holds (frames sent while the orchestrator restarted, which ZeroMQ
        would deliver to the new one, for requests the new one never sent here and may have
        sent here again) is dropped, here at the close and there by its name."""
        worker = self.worker
        instance = worker.orchestrator_instance
        if self._sockets is not None:
            old, ends = self._sockets
            old.close(linger=0)
        else:
            ends = socket(worker.ctx, zmq.PUSH)
            ends.connect(worker.results_address)
        link = worker.dial(zmq.DEALER, worker.orchestrator, WORKER)
        link.setsockopt(zmq.ROUTING_ID, self.link_id + b"\x00" + instance.encode())
        link.connect(worker.orchestrator)
        self._sockets = link, ends
        self._linked_to = instance
        return link, ends

    def send(self, link: zmq.Socket[bytes], frames: list[bytes]) -> None:
        """Never wait: with the orchestrator gone long enough for the link to fill, the frame
        is dropped (its requests have failed at the gateway meanwhile)."""
        try:
            link.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.worker.counters["undeliverable"] += 1

    def on_step(self, step: Step) -> None:
        """One engine step's events: coalesce text per destination, send what is due, then the
        Done or Error of each request that finished."""
        now = time.perf_counter()
        urgent: list[Outbox] = []
        started: set[str] = set()
        finished: list[tuple[Stream, TokenEvent]] = []
        for job, event in step:
            stream = job.tag
            if not isinstance(stream, Stream):
                deliver_to_queues([(job, event)])  # an in-process generation (the warm-up)
                continue
            first = event.n_tokens and stream.gen.first_token is None
            stream.gen.record(event)
            if event.n_tokens or event.text:
                stream.pending.append(event.text)
                stream.n_pending += event.n_tokens
                if event.logprobs:
                    stream.logprobs.extend(event.logprobs)
                box = self._outboxes.get(stream.route)
                if box is None:
                    box = self._outboxes[stream.route] = Outbox(stream.route)
                if not box.streams:
                    box.due = now + self.worker.stream_interval_s
                    self._dirty.append(box)
                if len(stream.pending) == 1:
                    box.streams.append(stream)
                if first:
                    started.add(stream.envelope.id)
                    urgent.append(box)  # a first token never waits
            if event.finish_reason is not None:
                finished.append((stream, event))
                box = self._outboxes.get(stream.route)
                if box is not None:
                    urgent.append(box)
        if not self._dirty and not finished:
            return  # (a warm-up's steps: nothing for the network)
        sockets = self._sockets
        if sockets is None or self._linked_to != self.worker.orchestrator_instance:
            sockets = self.open()
        link, ends = sockets
        if self._dirty:
            keep = []
            for box in self._dirty:
                if box.streams and (now >= box.due or box in urgent):
                    self.flush(link, box, started)
                elif box.streams:
                    keep.append(box)
            self._dirty = keep
        for stream, event in finished:
            body = self.worker.finish(stream, event)
            # The main loop hears first: it never counts a slot busy that the orchestrator,
            # having read the Done, already fills again.
            ends.send_multipart([FINAL, stream.envelope.id.encode()])
            self.send(link, [body])

    def flush(self, link: zmq.Socket[bytes], box: Outbox, started: set[str]) -> None:
        """One stream frame with every pending part bound for ``box``'s client.  The ids of
        streams whose first text it carries ride in the same ZeroMQ message, after the body
        (delivered whole or not at all): the orchestrator counts a request as started only
        when its first text is really on its way."""
        parts = []
        for stream in box.streams:
            text = "".join(stream.pending)
            if stream.logprobs:
                parts.append(wire.Part(stream.envelope.id, text, stream.n_pending, stream.logprobs))
                stream.logprobs = []
            else:
                parts.append(wire.Part(stream.envelope.id, text, stream.n_pending))
            stream.pending.clear()
            stream.n_pending = 0
        box.streams.clear()
        del self._outboxes[box.route]  # made again on demand: clients come and go
        frames = [*box.route, wire.encode(wire.Chunks(parts=parts))]
        first = [part.id for part in parts if part.id in started]
        if first:
            frames.append(wire.encode(wire.Started(ids=first)))
        self.send(link, frames)


class WorkerDaemon(Daemon):
    name = "worker"

    def __init__(
        self,
        orchestrator: str,
        model_ref: str,
        settings: Settings,
        *,
        worker_id: str | None = None,
        heartbeat_s: float = 0.5,
        orchestrator_timeout_s: float = 3.0,
        drain_grace_s: float = 30.0,
        stream_interval_s: float = STREAM_INTERVAL_S,
        ready_file: Path | None = None,
        memory: int = 0,
        memory_share: float = 1.0,
        labels: dict[str, str] | None = None,
        keep_alive_s: float | None = 300.0,
    ) -> None:
        super().__init__(ready_file)
        # bytes its models may take (0: memory_share of what is free when it starts)
        self.memory_budget = memory
        self.memory_share = memory_share
        self.labels = dict(labels or {})
        self.keep_alive_s = keep_alive_s  # what it asks for an idle model (None: keep)
        self.orchestrator = orchestrator
        self.model_ref = model_ref
        self.settings = settings
        self.worker_id = worker_id or f"{pysocket.gethostname()}-{os.getpid()}"
        self.heartbeat_s = heartbeat_s  # until the orchestrator says (Ack.heartbeat_s)
        self.tick_s = heartbeat_s
        self.orchestrator_timeout_s = orchestrator_timeout_s
        self.phase = zlib.crc32(self.worker_id.encode()) % HEARTBEAT_PHASES / HEARTBEAT_PHASES
        self.drain_grace_s = drain_grace_s
        self.stream_interval_s = stream_interval_s
        self.models: dict[str, Held] = {}  # loaded, by reference (the main loop's)
        self.used = 0  # bytes they take (read by the loader thread)
        self.loading: set[str] = set()  # loads handed to the loader thread
        self.backend = "cpu"
        self.known = False  # the orchestrator's last Ack said it has us in its table
        self.was_known = False  # some orchestrator had us in its table once
        self.last_ack = 0.0  # when anything last came from the orchestrator
        self.streams: dict[str, Stream] = {}  # main loop's view: submitted, not yet finished
        self.results_address = f"inproc://results-{uuid.uuid4().hex}"
        self.links = 0  # engine links opened so far (each model's engine has one)
        # the orchestrator instance we registered with last (its Ack says): each engine's
        # link is named after it, and made again when it changes
        self.orchestrator_instance = ""
        self.drain_ack_by = 0.0  # draining: wait until then for the orchestrator's answer
        # the embedding thread: requests in, answers out through the results socket
        self._embed_inbox: queue.SimpleQueue[tuple[wire.Envelope, EmbedRequest, Held] | None] = (
            queue.SimpleQueue()
        )
        self._embed_thread: threading.Thread | None = None
        # the loader thread: loads and unloads in, outcomes out (and a LOADER frame to wake
        # the main loop)
        self._tasks: queue.SimpleQueue[wire.Load | Held | None] = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue[Held | wire.LoadFailed] = queue.SimpleQueue()
        self._loader_thread: threading.Thread | None = None
        self._loader_out: zmq.Socket[bytes] | None = None

    # start -----------------------------------------------------------------------------------
    def resolve(self, deadline_s: float = 60.0) -> wire.ModelInfo:
        if looks_like_path(self.model_ref):
            return model_at(self.model_ref)
        rpc = RpcClient(self.ctx, self.orchestrator, "orchestrator", self.keyring, WORKER)
        end = time.monotonic() + deadline_s
        try:
            while True:
                try:
                    answer = rpc.call(wire.ResolveModel(ref=self.model_ref), timeout=2.0)
                    break
                except Unavailable:
                    if time.monotonic() > end or self.should_exit:
                        raise
                    log(self.name, "waiting for the orchestrator", address=self.orchestrator)
        finally:
            rpc.close()
        if isinstance(answer, wire.Error):
            raise HaifError.from_wire(answer)
        if not isinstance(answer, wire.ModelInfo):
            raise HaifError("protocol_error", f"unexpected answer {type(answer).__name__}")
        return answer

    def start(self) -> None:
        self.results = socket(self.ctx, zmq.PULL)
        self.results.bind(self.results_address)
        self.backend = gpu_backend()[0]
        if not self.memory_budget:
            self.memory_budget = int(available_memory(self.backend) * self.memory_share)
        info = self.resolve()
        started = time.perf_counter()
        held = self.load(info, 0, "")
        self.models[held.ref] = held
        self.used += held.state.size_bytes
        log(
            self.name,
            "model loaded",
            model=held.ref,
            path=info.path,
            load_ms=round((time.perf_counter() - started) * 1000, 1),
            device=held.loaded.device.backend,
            slots=held.loaded.slots,
            threads=held.loaded.device.threads,
            embeddings=held.loaded.embeddings,
            size_bytes=held.state.size_bytes,
            memory_budget=self.memory_budget,
        )
        if self.settings.embeddings:
            self._embed_thread = threading.Thread(
                target=self.embed_loop, name="embeddings", daemon=True
            )
            self._embed_thread.start()
        self._loader_thread = threading.Thread(target=self.loader_loop, name="loader", daemon=True)
        self._loader_thread.start()
        self.gpu = self.gpu_facts()
        self.connect()
        self.watch(self.results, self.read_results)
        self.endpoints["orchestrator"] = self.orchestrator

    def load(self, info: wire.ModelInfo, n_ctx: int, sha256: str, on_demand: bool = False) -> Held:
        """Load ``info`` (on the loader thread, or at start): check its file against the
        registry's checksum, refuse what the memory budget cannot hold, warm its engine up."""
        path = Path(info.path)
        try:
            file_bytes = path.stat().st_size
        except OSError as exc:
            raise HaifError(
                "model_load_failed",
                f"cannot read {path}: {exc.strerror or exc}",
                "check the path the registry has for the model",
            ) from None
        free = self.memory_budget - self.used
        if self.memory_budget and estimate_bytes(file_bytes) > free:
            raise self.out_of_memory(info.ref, estimate_bytes(file_bytes), free)
        if sha256:
            digest = sha256_file(path)
            if digest != sha256:
                raise HaifError(
                    "checksum_mismatch",
                    f"{info.ref}: {path} has sha256 {digest[:12]}..., the registry says "
                    f"{sha256[:12]}...",
                    "the file changed since it was registered: register it again",
                )
        settings = self.settings
        if n_ctx > 0:
            settings = dataclasses.replace(settings, n_ctx=n_ctx)
        started = time.perf_counter()
        self.links += 1  # (loads run one at a time: on the loader thread, or at start)
        relay = Relay(self, self.worker_id.encode() + b"\x00" + str(self.links).encode())
        loaded = load_model(settings, info, relay.on_step)
        kv_bytes = getattr(loaded, "kv_bytes", lambda: 0)()
        size = file_bytes + kv_bytes
        if self.memory_budget and size > free:
            loaded.close()
            relay.close()
            raise self.out_of_memory(info.ref, size, free)
        # One token first: the engine thread's first decode sets up its thread pool and
        # buffers, which would otherwise land on the first user's time to first token.
        for _ in loaded.generate("", SamplingParams(max_tokens=1, seed=0)):
            pass
        n_layers = int(getattr(loaded, "n_layers", 0))
        offloaded = loaded.device.n_gpu_layers if loaded.device.gpu_offload else 0
        state = wire.ModelState(
            ref=info.ref,
            size_bytes=size,
            weights_bytes=file_bytes,
            kv_bytes=kv_bytes,
            n_ctx=loaded.info.n_ctx,
            slots=loaded.slots,
            n_gpu_layers=n_layers if offloaded < 0 else min(offloaded, n_layers),
            n_layers=n_layers,
            embeddings=loaded.embeddings,
            on_demand=on_demand,
        )
        self.metrics.model_load.labels(info.ref).set(time.perf_counter() - started)
        return Held(info, loaded, relay, state)

    def out_of_memory(self, ref: str, need: int, free: int) -> HaifError:
        return HaifError(
            "out_of_memory",
            f"{ref} needs {human_bytes(need)}; worker {self.worker_id} has "
            f"{human_bytes(max(0, free))} free of {human_bytes(self.memory_budget)}",
            "unload a model (haifctl models unload NAME) or give the worker more --memory",
        )

    # the loader thread -----------------------------------------------------------------------
    def loader_loop(self) -> None:
        """Loads and unloads, one at a time, in the order the main loop handed them over."""
        out = self._loader_out = socket(self.ctx, zmq.PUSH)
        out.connect(self.results_address)
        try:
            while (task := self._tasks.get()) is not None:
                if isinstance(task, Held):
                    self.close_model(task)
                    continue
                info = wire.ModelInfo(
                    ref=task.ref, path=task.path, context_length=task.context_length
                )
                started = time.perf_counter()
                outcome: Held | wire.LoadFailed
                try:
                    outcome = self.load(info, task.n_ctx, task.sha256, on_demand=True)
                except HaifError as exc:
                    outcome = wire.LoadFailed(
                        ref=task.ref,
                        kind=exc.kind.value,
                        code=exc.code,
                        message=exc.message,
                        hint=exc.hint,
                    )
                except Exception as exc:  # a bug must not end the thread: the load fails
                    outcome = wire.LoadFailed(
                        ref=task.ref, code="model_load_failed", message=f"{task.ref}: {exc!r}"
                    )
                log(
                    self.name,
                    "model loaded" if isinstance(outcome, Held) else "model load failed",
                    level="info" if isinstance(outcome, Held) else "warning",
                    model=task.ref,
                    load_ms=round((time.perf_counter() - started) * 1000, 1),
                    error=getattr(outcome, "message", None),
                )
                self._outcomes.put(outcome)
                out.send_multipart([LOADER])
        finally:
            out.close(linger=0)

    def close_model(self, held: Held) -> None:
        held.loaded.close()  # stops its engine thread first
        held.relay.close()
        log(self.name, "model unloaded", model=held.ref, size_bytes=held.state.size_bytes)

    def loaded_outcomes(self) -> None:
        """The loader thread finished loads: take them in (or report them failed) and tell
        the orchestrator."""
        changed = False
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                break
            if isinstance(outcome, wire.LoadFailed):
                self.loading.discard(outcome.ref)
                self.dealer.send(wire.encode(outcome))
                continue
            self.loading.discard(outcome.ref)
            if outcome.ref in self.models or not self.accepting:
                self._tasks.put(outcome)  # loaded twice, or shutting down: let it go
                continue
            self.models[outcome.ref] = outcome
            self.used += outcome.state.size_bytes
            changed = True
        if changed:
            self.register()

    def take_load(self, msg: wire.Load) -> None:
        """The orchestrator wants a model here: the loader thread loads it (once)."""
        if msg.ref in self.models:
            self.register()  # it has it already: say so again
            return
        if msg.ref in self.loading or not self.accepting:
            return
        self.loading.add(msg.ref)
        self._tasks.put(msg)

    def take_unload(self, ref: str) -> None:
        """The orchestrator sends this model nothing more: free it once its requests end."""
        held = self.models.pop(ref, None)
        if held is not None:
            self.used -= held.state.size_bytes
            held.unloading = True
            if not held.streams:
                self._tasks.put(held)
        self.register()

    def connect(self) -> None:
        """Open the orchestrator link, once: ZeroMQ reconnects it by itself, and keeping it
        keeps the order of everything sent both ways (an Infer on its way is never lost to
        a new socket).  The identity is the worker id, stable across silences."""
        self.dealer = self.dial(zmq.DEALER, self.orchestrator, WORKER)
        self.dealer.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())
        self.dealer.connect(self.orchestrator)
        self.watch(self.dealer, self.read_orchestrator)
        self.last_ack = time.monotonic()
        self.registered_at = 0.0
        self.register()

    def gpu_facts(self) -> tuple[str, int]:
        """GPU name and memory (MiB) for the registration, when nvidia-smi can tell."""
        if self.backend != "cuda":
            return "", 0
        facts = nvidia_smi("name", "memory.total")
        try:
            return facts[0], int(float(facts[1]))
        except (IndexError, ValueError):
            return "", 0

    def register(self) -> None:
        """Announce this worker, its models and its memory (again after any change)."""
        self.registered_at = time.monotonic()
        helds = list(self.models.values())
        self.dealer.send(
            wire.encode(
                wire.Register(
                    worker_id=self.worker_id,
                    models=[h.ref for h in helds],
                    slots=sum(h.loaded.slots for h in helds) or 1,
                    device=self.backend,
                    gpu_name=self.gpu[0],
                    gpu_memory_mb=self.gpu[1],
                    n_ctx=max((h.loaded.info.n_ctx for h in helds), default=0),
                    pid=os.getpid(),
                    host=pysocket.gethostname(),
                    running=list(self.streams),
                    embeddings=self.settings.embeddings,
                    loaded=[h.state for h in helds],
                    loading=sorted(self.loading),
                    memory_budget=self.memory_budget,
                    memory_used=self.used,
                    labels=self.labels,
                    keep_alive_s=self.keep_alive_s,
                    rejoin=self.was_known and not self.known,
                )
            )
        )

    # loop (main thread) ----------------------------------------------------------------------
    def in_flight(self) -> int:
        """Requests running, plus one while a drain waits for the orchestrator's answer."""
        return len(self.streams) + (time.monotonic() < self.drain_ack_by)

    def alive_checks(self) -> dict[str, bool]:
        """Each model's engine thread runs its generations, the loader thread its loads:
        without them the worker can only be restarted."""
        checks = {"engine": all(held.loaded.engine.alive for held in self.models.values())}
        if self._loader_thread is not None:
            checks["loader"] = self._loader_thread.is_alive()
        if self._embed_thread is not None:
            checks["embeddings"] = self._embed_thread.is_alive()
        return checks

    def silence_limit(self) -> float:
        """How long the orchestrator may say nothing before it counts as lost: it answers a
        heartbeat only when asked, which a worker does after half of this."""
        return max(self.orchestrator_timeout_s, 6 * self.heartbeat_s)

    def ready_checks(self) -> dict[str, bool]:
        """Ready when the model is loaded and the orchestrator has us registered and has
        been heard from within :meth:`silence_limit`."""
        registered = self.known and time.monotonic() - self.last_ack <= self.silence_limit()
        return {
            **super().ready_checks(),
            "model_loaded": bool(self.models),
            "registered": registered,
        }

    def health_detail(self) -> dict[str, Any]:
        return {
            "model": next(iter(self.models), self.model_ref),
            "models": list(self.models),
            "busy": len(self.streams),
        }

    def on_drain(self) -> None:
        """Tell the orchestrator now, and ask it to answer: it may have sent us a request
        before it heard (a slot came free just then), and that request arrives before the
        answer (one connection keeps the order), so we refuse it (``worker_draining``, tried
        elsewhere) rather than exit with it unread.  A silent orchestrator is waited for
        DRAIN_ACK_S at most."""
        self.drain_ack_by = time.monotonic() + DRAIN_ACK_S
        self.heartbeat(DRAIN_ID)

    def on_tick(self, now: float) -> None:
        self.heartbeat()
        limit = self.silence_limit()
        if now - self.heard_since(self.last_ack) > limit and now - self.registered_at > limit:
            log(self.name, "orchestrator silent; announcing ourselves again", level="warning")
            self.register()
        # the next tick at this worker's phase of the interval, on the wall clock
        wall, interval = time.time(), self.heartbeat_s
        self.tick_s = max(0.001, interval - (wall - self.phase * interval) % interval)

    def heartbeat(self, request_id: str = "") -> None:
        """Proof of life and counters; asks for an answer only after half the silence limit
        without a word from the orchestrator, or when it names a ``request_id`` (the answer
        then carries it)."""
        ask = not self.known or time.monotonic() - self.last_ack >= self.silence_limit() / 2
        self.dealer.send(
            wire.encode(
                wire.Heartbeat(
                    worker_id=self.worker_id,
                    busy=len(self.streams),
                    served=self.counters["served"],
                    errors=self.counters["errors"],
                    tokens=self.counters["tokens"],
                    draining=not self.accepting,
                    memory_budget=self.memory_budget,
                    memory_used=self.used,
                    ack=ask or bool(request_id),
                ),
                request_id,
            )
        )

    def read_results(self) -> None:
        """Forget requests that have finished (forwarding an embedding thread's answer: an
        engine sent its own); take in what the loader thread did."""
        for frames in incoming(self.results):
            kind = frames[0]
            if kind == FINAL and len(frames) >= 2:
                stream = self.streams.pop(frames[1].decode(), None)
                if stream is not None:
                    self.ended(stream.held)
                if len(frames) == 3:
                    self.dealer.send(frames[2])
            elif kind == LOADER:
                self.loaded_outcomes()

    def ended(self, held: Held) -> None:
        """A request on ``held`` ended: an unloaded model goes once its last one has."""
        held.streams -= 1
        if held.unloading and held.streams <= 0:
            self._tasks.put(held)

    def read_orchestrator(self) -> None:
        # Ends first: an engine tells this loop that a request ended before it tells the
        # orchestrator, which may already have sent the next request for the freed slot.
        self.read_results()
        for frames in incoming(self.dealer):
            envelope = self.decode(frames[-1])
            if envelope is None:
                continue
            msg = envelope.msg
            now = self.last_ack = time.monotonic()  # whatever it sends proves it is there
            if isinstance(msg, wire.Ack):
                if envelope.id == DRAIN_ID:
                    self.drain_ack_by = 0.0  # it knows we drain: nothing more comes
                self.known = msg.known
                self.was_known = self.was_known or msg.known
                if msg.instance:  # the answer to our Register: engines link to this one
                    self.orchestrator_instance = msg.instance
                if msg.heartbeat_s > 0:
                    self.heartbeat_s = msg.heartbeat_s
                if not msg.known and now - self.registered_at > 0.5:
                    # (heartbeats queued while it was away each get this answer: once is enough)
                    log(self.name, "orchestrator does not know us; registering again")
                    self.register()
                for request_id in msg.cancel:
                    self.stop_orphan(request_id)
            elif isinstance(msg, wire.Infer):
                self.safely(self.accept, envelope, msg)
            elif isinstance(msg, wire.Cancel):
                stream = self.streams.get(envelope.id)
                if stream is not None and stream.job is not None:
                    stream.job.cancel.cancel()
                    self.counters["cancelled"] += 1
                    log(self.name, "cancelled", request_id=envelope.id)
            elif isinstance(msg, wire.Ping):
                self.dealer.send(wire.reply(envelope, self.pong()))
            elif isinstance(msg, wire.Load):
                self.take_load(msg)
            elif isinstance(msg, wire.Unload):
                self.take_unload(msg.ref)
            else:
                self.counters["unexpected_messages"] += 1

    def stop_orphan(self, request_id: str) -> None:
        """A request the orchestrator gave up on while we were silent (failed, or sent to
        another worker): stop it; the orchestrator drops its text and frees the slot when its
        end arrives."""
        stream = self.streams.get(request_id)
        if stream is None:
            # It ended already: its Done, sent on the engine's link, crossed our registration
            # (which still named it) on the way.  Say again that it ended, so the orchestrator
            # frees its slot.
            ended = wire.Error(kind=Kind.unavailable, code="ended", message="the request ended")
            self.dealer.send(wire.encode(ended, request_id))
        elif stream.job is not None:
            stream.job.cancel.cancel()
            self.counters["orphans_stopped"] += 1
            log(self.name, "stopped a request the orchestrator gave up on", request_id=request_id)

    def held_for(self, msg: wire.Infer) -> Held | None:
        """The model a request runs on (a request from an orchestrator that names no model:
        the only one loaded)."""
        if msg.model_ref:
            return self.models.get(msg.model_ref)
        return next(iter(self.models.values())) if len(self.models) == 1 else None

    def accept(self, envelope: wire.Envelope, msg: wire.Infer) -> None:
        held = self.held_for(msg)
        refusal = None
        if not self.accepting:
            refusal = wire.Error(
                kind=Kind.unavailable, code="worker_draining", message="the worker is shutting down"
            )
        elif held is None:
            refusal = wire.Error(
                kind=Kind.unavailable,
                code="model_not_loaded",
                message=f"{msg.model_ref or 'the model'} is not loaded on this worker",
            )
        elif held.streams >= held.loaded.slots:
            refusal = wire.Error(
                kind=Kind.overloaded, code="worker_busy", message="no free slot on this worker"
            )
        elif envelope.id in self.streams:
            refusal = wire.Error(
                kind=Kind.invalid, code="duplicate_request", message="request id already running"
            )
        elif len(msg.route) != wire.ROUTE_FRAMES:
            refusal = wire.Error(
                kind=Kind.invalid, code="invalid_request", message="the request has no route"
            )
        if refusal is not None:
            self.dealer.send(wire.reply(envelope, refusal))
            return
        assert held is not None
        if msg.request.get("op") is not None:
            self.answer_op(envelope, msg, held)
            return
        loaded = held.loaded
        stream = Stream(envelope, tuple(reversed(msg.route)), held)
        try:
            request = validate_request(msg.request, "request")
            params = request.sampling(msg.model_params, self.settings.max_tokens)
            prompt = render_prompt(request, loaded)
            tokens = prompt if isinstance(prompt, list) else loaded.tokenize(prompt)
            n_ctx = loaded.info.n_ctx
            if not msg.truncate and len(tokens) + params.max_tokens > n_ctx:
                # A worker with a larger context may take it whole: the orchestrator decides.
                need = len(tokens) + params.max_tokens
                self.dealer.send(
                    wire.reply(
                        envelope,
                        wire.ContextTooSmall(need=need, prompt_tokens=len(tokens), n_ctx=n_ctx),
                    )
                )
                return
            stream.job = loaded.job(tokens, params, tag=stream)
        except HaifError as exc:
            self.counters["errors"] += 1
            self.metrics.requests.labels(self.name, "generate", exc.code).inc()
            self.trace(envelope, stream, None, exc.code)
            self.dealer.send(wire.reply(envelope, exc.to_wire()))
            return
        self.streams[envelope.id] = stream
        held.streams += 1
        loaded.engine.submit(stream.job)

    def answer_op(self, envelope: wire.Envelope, msg: wire.Infer, held: Held) -> None:
        """A request that generates nothing: tokenize and detokenize answered here; an embed
        request handed to the embedding thread."""
        loaded = held.loaded
        op = str(msg.request.get("op"))
        try:
            request = validate_any(msg.request, "request")
            if isinstance(request, EmbedRequest):
                self.check_embed(request, held)
                self.streams[envelope.id] = Stream(envelope, (), held)
                held.streams += 1
                self._embed_inbox.put((envelope, request, held))
                return
            if isinstance(request, TokenizeRequest):
                ids = loaded.tokenize_text(
                    request.content, request.add_special, request.parse_special
                )
                pieces = [loaded.token_piece(t) for t in ids] if request.with_pieces else []
                answer: wire.Msg = wire.Tokens(
                    ids=ids, pieces=pieces, model=held.ref, worker=self.worker_id
                )
            elif isinstance(request, DetokenizeRequest):
                text = loaded.detokenize(list(request.tokens))
                answer = wire.Tokens(text=text, model=held.ref, worker=self.worker_id)
            else:
                raise InvalidInput("invalid_request", f"request: op {op!r} is not answered here")
        except HaifError as exc:
            answer = exc.to_wire()
        self.dealer.send(self.answer_body(envelope, op, answer))

    def check_embed(self, request: EmbedRequest, held: Held) -> None:
        """Refuse, before queueing, what the embedding thread could not answer: no
        embeddings here, or more vectors than one answer frame holds."""
        loaded = held.loaded
        if not loaded.embeddings:
            raise InvalidInput(
                "embeddings_unsupported",
                f"this worker serves {held.ref} without embeddings",
                "start a worker with --embeddings (or HAIF_EMBEDDINGS=1) for it",
            )
        most = (wire.MAX_FRAME_BYTES - 4096) // (4 * loaded.n_embd + 8)
        if len(request.input) > most:
            raise InvalidInput(
                "too_many_inputs",
                f"input: {len(request.input)} items; one answer holds at most {most} vectors "
                f"of {loaded.n_embd} numbers",
                "split the inputs over several requests",
            )

    def answer_body(self, envelope: wire.Envelope, op: str, answer: wire.Msg) -> bytes:
        """The frame that answers a request of ``op``, counted; an answer over the frame limit
        becomes an error saying so (no relay could pass it on)."""
        body = wire.reply(envelope, answer)
        if len(body) > wire.MAX_FRAME_BYTES:
            answer = InvalidInput(
                "answer_too_large",
                f"the answer takes {len(body)} bytes, over the limit of {wire.MAX_FRAME_BYTES}",
                "send less text (or fewer inputs) per request",
            ).to_wire()
            body = wire.reply(envelope, answer)
        outcome = answer.code if isinstance(answer, wire.Error) else "ok"
        self.counters["errors" if isinstance(answer, wire.Error) else "served"] += 1
        self.metrics.requests.labels(self.name, op, outcome).inc()
        return body

    # the embedding thread --------------------------------------------------------------------
    def embed_loop(self) -> None:
        """Embed one request at a time; each answer goes to the main loop as a final frame."""
        out = socket(self.ctx, zmq.PUSH)
        out.connect(self.results_address)
        try:
            while (item := self._embed_inbox.get()) is not None:
                envelope, request, held = item
                body = self.answer_body(envelope, "embed", self.embedded(envelope, request, held))
                out.send_multipart([FINAL, envelope.id.encode(), body])
        finally:
            out.close(linger=0)

    def embedded(self, envelope: wire.Envelope, request: EmbedRequest, held: Held) -> wire.Msg:
        if wire.expired(envelope):
            return wire.Error(
                kind=Kind.timeout, code="deadline_exceeded", message="the deadline had passed"
            )
        try:
            vectors, n_tokens = held.loaded.embed(list(request.input))
        except HaifError as exc:
            return exc.to_wire()
        except Exception as exc:  # a bug must not end the thread: the request fails
            log(self.name, "embedding failed", level="error", error=repr(exc))
            return wire.Error(kind=Kind.internal, code="embedding_failed", message=repr(exc))
        self.metrics.prompt_tokens.labels(held.ref).inc(n_tokens)
        return wire.Embeddings(
            vectors=[wire.float32_bytes(v) for v in vectors],
            prompt_tokens=n_tokens,
            model=held.ref,
            worker=self.worker_id,
        )

    # the engine threads (each through its model's Relay) ------------------------------------
    def finish(self, stream: Stream, event: TokenEvent) -> bytes:
        """The Done or Error that ends ``stream`` (counted, recorded and traced)."""
        envelope = stream.envelope
        gen = stream.gen
        msg: wire.Msg
        if event.finish_reason == "error":
            self.counters["errors"] += 1
            self.metrics.requests.labels(self.name, "generate", event.error).inc()
            log(self.name, "generation failed", level="error", error=event.message)
            self.trace(envelope, stream, None, event.error)
            msg = wire.Error(
                kind=event.kind or Kind.internal,
                code=event.error,
                message=f"worker error: {event.message}",
            )
        else:
            self.record(event, gen, stream.held.ref)
            self.trace(envelope, stream, event, None)
            self.counters["served"] += 1
            self.counters["tokens"] += event.completion_tokens
            msg = wire.Done(
                finish_reason=event.finish_reason or "stop",
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                model=stream.held.ref,
                worker=self.worker_id,
                time_to_first_token_ms=gen.ttft_ms,
                generation_ms=gen.generation_ms,
            )
        return wire.reply(envelope, msg)

    def record(self, event: TokenEvent, gen: Generation, model: str) -> None:
        m = self.metrics
        m.requests.labels(self.name, "generate", event.finish_reason or "stop").inc()
        m.request_duration.labels(self.name, "generate").observe(gen.generation_ms / 1000)
        m.prompt_tokens.labels(model).inc(event.prompt_tokens)
        m.generated_tokens.labels(model).inc(event.completion_tokens)
        if gen.ttft_ms is not None:
            m.ttft.labels(self.name, model).observe(gen.ttft_ms / 1000)
            if event.completion_tokens > 1:
                decode_s = (gen.generation_ms - gen.ttft_ms) / 1000
                m.tpot.labels(model).observe(decode_s / (event.completion_tokens - 1))

    def trace(
        self,
        envelope: wire.Envelope,
        stream: Stream,
        event: TokenEvent | None,
        error: str | None,
    ) -> None:
        """Spans for one generation: the whole of it, prompt processing, and decoding."""
        if self.tracing is None:
            return
        started_ns, started = stream.started_ns, stream.gen.started
        first = stream.gen.first_token
        now = stream.gen.finished or time.perf_counter()
        from opentelemetry import trace as otel
        from opentelemetry.trace import StatusCode

        from haifctl.tracing import parent_context

        def at(t: float) -> int:
            return started_ns + int((t - started) * 1e9)

        tracer = self.tracing.tracer
        span = tracer.start_span(
            "worker generate",
            context=parent_context(envelope.traceparent),
            start_time=started_ns,
            attributes={
                "haif.request_id": envelope.id,
                "haif.worker": self.worker_id,
                "haif.model": stream.held.ref,
            },
        )
        inside = otel.set_span_in_context(span)
        if event is not None:
            span.set_attributes(
                {
                    "haif.finish_reason": event.finish_reason or "",
                    "haif.prompt_tokens": event.prompt_tokens,
                    "haif.completion_tokens": event.completion_tokens,
                }
            )
            prompt = tracer.start_span(
                "prompt processing",
                context=inside,
                start_time=started_ns,
                attributes={"haif.prompt_tokens": event.prompt_tokens},
            )
            prompt.end(end_time=at(first if first is not None else now))
            if first is not None:
                decode = tracer.start_span(
                    "generation",
                    context=inside,
                    start_time=at(first),
                    attributes={"haif.completion_tokens": event.completion_tokens},
                )
                decode.end(end_time=at(now))
        if error is not None:
            span.set_status(StatusCode.ERROR, error)
        span.end(end_time=at(now))

    def stop(self) -> None:
        for stream in self.streams.values():
            if stream.job is not None:
                stream.job.cancel.cancel()
        if self._embed_thread is not None:
            self._embed_inbox.put(None)
            self._embed_thread.join()
        if self._loader_thread is not None:
            self._tasks.put(None)
            self._loader_thread.join()
        for held in self.models.values():
            self.close_model(held)  # stops its engine thread first
        self.models.clear()
        super().stop()
