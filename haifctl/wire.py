"""The wire protocol between haifctl daemons: typed, versioned msgpack messages over ZeroMQ.

Every ZeroMQ message is ``[routing frames..., body]`` where ``body`` is one msgpack-encoded
:class:`Envelope`.

Streamed text travels differently, so that relays never decode it: a worker sends, once per
engine step and destination, ``[gateway identity, client identity, body]`` where ``body`` is a
:class:`Chunks` envelope holding the new text of every stream bound there (then, in the same
ZeroMQ message, a :class:`Started` note for the orchestrator when it carries a stream's first
text).  The orchestrator and the gateway each pop one routing frame and forward the rest as
bytes; the client decodes it.
Requests name their route in :attr:`Infer.route` (each hop appends the identity it received
the request from).  The envelope carries the protocol version, the request id, an absolute deadline
(Unix seconds; 0 = none), the W3C ``traceparent`` and one typed message.  Anything that does not
decode into an envelope of this version is counted and dropped by the receiver; nothing on a
socket can crash a daemon.  Never pickle.
"""

from __future__ import annotations

import array
import sys
import time
import uuid
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
ROUTE_FRAMES = 2  # [gateway, client] in front of a worker's stream frame
MAX_FRAME_BYTES = 1024 * 1024  # a body above this is dropped unread (prompts are capped lower)
# A longer model reference is refused before any lookup: the registry's own limit
# (haifctl.registry.service.MAX_REF_CHARS, NAME:VERSION), checked here without importing it.
MAX_MODEL_REF_CHARS = 257


class Msg(msgspec.Struct, frozen=True, tag_field="t", kw_only=True):
    """Base of every message; ``t`` (the class name) tags it on the wire."""


# readiness and stats -----------------------------------------------------------------------
class Ping(Msg, frozen=True, tag=True, kw_only=True):
    pass


class Pong(Msg, frozen=True, tag=True, kw_only=True):
    daemon: str
    pid: int
    version: str
    ready: bool = True
    # Random per process start: a peer that sees it change knows the daemon restarted and
    # forgot what it was doing.
    instance: str = ""


class StatsRequest(Msg, frozen=True, tag=True, kw_only=True):
    pass


class ModelState(msgspec.Struct, frozen=True, kw_only=True):
    """One model loaded on a worker: what it takes in memory and how it runs.  The worker
    fills in what it knows; the orchestrator's stats add the use it has seen."""

    ref: str
    size_bytes: int = 0  # weights + KV cache
    weights_bytes: int = 0
    kv_bytes: int = 0
    n_ctx: int = 0
    slots: int = 1
    n_gpu_layers: int = 0  # layers offloaded to the GPU
    n_layers: int = 0
    embeddings: bool = False
    on_demand: bool = False  # loaded when an orchestrator said (not the one it started with)
    # the orchestrator's view, in Stats
    busy: int = 0
    served: int = 0
    idle_s: float = 0.0
    keep_alive_left_s: float | None = None  # None: kept loaded


class WorkerState(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    models: list[str]
    slots: int
    busy: int
    device: str
    gpu_name: str = ""
    gpu_memory_mb: int = 0
    n_ctx: int
    served: int
    errors: int
    tokens: int
    last_seen_s: float
    pid: int
    host: str
    loaded: list[ModelState] = []
    loading: list[str] = []
    memory_budget: int = 0  # bytes (0: unknown)
    memory_used: int = 0
    labels: dict[str, str] = {}


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """Requests finished in the last ``seconds``, as the orchestrator saw them."""

    seconds: float
    requests: int
    errors: int
    requests_per_s: float
    tokens_per_s: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    worker_tokens_per_s: dict[str, float] = {}


class Stats(Msg, frozen=True, tag=True, kw_only=True):
    daemon: str
    workers: list[WorkerState] = []
    queues: dict[str, int] = {}
    counters: dict[str, int] = {}
    window: Window | None = None
    uptime_s: float = 0.0


class ListModels(Msg, frozen=True, tag=True, kw_only=True):
    pass


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    ref: str
    name: str
    aliases: list[str]
    created_at: str
    status: str
    workers: int
    # no worker has it loaded, but one that loads models on demand has the memory for it
    loadable: bool = False


class ModelList(Msg, frozen=True, tag=True, kw_only=True):
    models: list[ModelEntry]


# inference ----------------------------------------------------------------------------------
class Infer(Msg, frozen=True, tag=True, kw_only=True):
    """A validated inference request (``request`` is an InferenceRequest as a dict)."""

    request: dict[str, Any]
    client: str = ""  # the client's key identity, for rate limits and logs
    model_ref: str = ""  # set by the orchestrator: the resolved NAME:VERSION
    model_path: str = ""
    model_params: dict[str, Any] = {}
    n_ctx_train: int | None = None
    # Where stream frames go: the identities the request came through, client first
    # ([client] from the gateway, [client, gateway] from the orchestrator).
    route: list[bytes] = []
    # Set by the orchestrator when no worker has a larger context: a prompt that fits runs
    # even if max_tokens would overflow it (generation stops when the context is full).
    truncate: bool = False


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token: str
    logprob: float
    raw: bytes  # the token's bytes (a token may hold part of a character)


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """A generated token's log-probability under the model, and the most likely tokens at its
    place (``top``, as many as the request asked for)."""

    token: str
    logprob: float
    raw: bytes  # the token's bytes (a token may hold part of a character)
    top: list[TopLogprob] = []


class Chunk(Msg, frozen=True, tag=True, kw_only=True):
    """Streamed text of one request; several tokens may be coalesced into one chunk.  Clients
    see it; on the wire it travels inside :class:`Chunks`."""

    text: str
    n_tokens: int
    logprobs: list[TokenLogprob] = []  # one per token, when the request asked for them


class Part(msgspec.Struct, frozen=True, array_like=True):
    id: str  # the request id
    text: str
    n_tokens: int
    logprobs: list[TokenLogprob] = []


class Chunks(Msg, frozen=True, tag=True, kw_only=True):
    """The new text of several streams bound for one client, sent once per engine step."""

    parts: list[Part]


class Started(Msg, frozen=True, tag=True, kw_only=True):
    """Worker -> orchestrator, as the last frame of the stream frame that carries these
    requests' first text: they have started (a request that has started streaming is never
    retried elsewhere)."""

    ids: list[str]


class Done(Msg, frozen=True, tag=True, kw_only=True):
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    worker: str
    time_to_first_token_ms: float | None
    generation_ms: float
    queue_ms: float = 0.0


class Embeddings(Msg, frozen=True, tag=True, kw_only=True):
    """The answer to an ``embed`` request: one L2-normalised vector per input, in order, each
    as little-endian float32 bytes (what OpenAI's base64 encoding holds; a quarter of msgpack's
    float64 list)."""

    vectors: list[bytes]
    prompt_tokens: int
    model: str
    worker: str


class Tokens(Msg, frozen=True, tag=True, kw_only=True):
    """The answer to a ``tokenize`` request (``ids``, and each one's bytes in ``pieces`` when
    asked for) or a ``detokenize`` one (``text``)."""

    ids: list[int] = []
    pieces: list[bytes] = []
    text: str = ""
    model: str
    worker: str


class Error(Msg, frozen=True, tag=True, kw_only=True):
    """A failure; build it with ``HaifError.to_wire`` or name its ``kind`` (haifctl.errors.Kind).

    ``kind`` is a plain string, not the enum, so that a kind added in a later version does not
    make a newer peer's error frames undecodable here; frames from before kinds existed decode
    with the default.
    """

    kind: str = "internal"
    code: str
    message: str
    hint: str = ""
    retry_after: float | None = None


class Cancel(Msg, frozen=True, tag=True, kw_only=True):
    pass


# workers ------------------------------------------------------------------------------------
class Register(Msg, frozen=True, tag=True, kw_only=True):
    worker_id: str
    models: list[str]  # NAME:VERSION refs this worker has loaded
    slots: int
    device: str
    gpu_name: str = ""
    gpu_memory_mb: int = 0
    n_ctx: int
    pid: int
    host: str
    # Requests still holding one of its slots (a worker registering again after a silence):
    # the orchestrator counts them as busy until their Done or Error arrives.
    running: list[str] = []
    # It loaded its models with embeddings: the orchestrator sends it embed requests.
    embeddings: bool = False
    # Models on demand: what each loaded model takes, the memory it may fill (bytes; 0:
    # unknown, taken as unlimited), what is used, what it is loading, its labels and the
    # keep-alive it gives an idle model (None: keep).  Older workers send none of it.
    loaded: list[ModelState] = []
    loading: list[str] = []
    memory_budget: int = 0
    memory_used: int = 0
    labels: dict[str, str] = {}
    keep_alive_s: float | None = 300.0
    # It was registered with an orchestrator before (this one restarted, or forgot it): an
    # orchestrator that sees one waits for the others to come back before loading elsewhere.
    rejoin: bool = False


class Heartbeat(Msg, frozen=True, tag=True, kw_only=True):
    """Worker -> orchestrator, every :attr:`Ack.heartbeat_s`: proof of life and counters.  It is
    answered only when the orchestrator does not know the worker (``Ack(known=False)``: register
    again) or when ``ack`` asks (a worker that has heard nothing from the orchestrator for a
    while); a worker that never sends ``ack`` (one from before it) is answered every time."""

    worker_id: str
    busy: int
    served: int
    errors: int
    tokens: int
    draining: bool = False
    memory_budget: int = 0
    memory_used: int = 0
    ack: bool = True


class Load(Msg, frozen=True, tag=True, kw_only=True):
    """Orchestrator -> worker: load this model (in the background; the worker announces its
    models again when it is in, or answers :class:`LoadFailed`)."""

    ref: str
    path: str
    sha256: str = ""  # checked against the file before loading, when the registry has it
    n_ctx: int = 0  # 0: the worker's own setting
    context_length: int | None = None


class Unload(Msg, frozen=True, tag=True, kw_only=True):
    """Orchestrator -> worker: unload this model (the orchestrator has stopped sending it
    requests; any still running finish first)."""

    ref: str


class LoadFailed(Msg, frozen=True, tag=True, kw_only=True):
    """Worker -> orchestrator: a :class:`Load` failed, and why (an Error's fields)."""

    ref: str
    kind: str = "internal"
    code: str
    message: str
    hint: str = ""


class ContextTooSmall(Msg, frozen=True, tag=True, kw_only=True):
    """Worker -> orchestrator, instead of starting a request: the prompt and its max_tokens
    need ``need`` tokens of context and this worker's model holds ``n_ctx``; the orchestrator
    sends it to a worker with a larger context (or back with ``Infer.truncate``)."""

    need: int
    prompt_tokens: int
    n_ctx: int


class ManageModel(Msg, frozen=True, tag=True, kw_only=True):
    """An operator's order to the orchestrator: ``op`` "load" (on ``worker``, or where the
    placement policy puts it) or "unload" (everywhere, or on ``worker``)."""

    op: str
    ref: str
    worker: str = ""
    n_ctx: int = 0


class ModelPlaced(Msg, frozen=True, tag=True, kw_only=True):
    """The answer to :class:`ManageModel`: the workers concerned, and what was decided."""

    ref: str
    workers: list[str] = []
    message: str = ""


class Ack(Msg, frozen=True, tag=True, kw_only=True):
    """The orchestrator's answer to Register and Heartbeat; ``known`` False asks to re-register."""

    known: bool = True
    # Answer to a Register: requests the worker reported running that are not its to run any
    # more (failed or moved elsewhere while it was silent): it stops them (one that ended
    # already, its Done having crossed the Register, it answers with an Error "ended").
    cancel: list[str] = []
    # Answer to a Register: seconds between heartbeats, a fraction of the orchestrator's
    # timeout for a silent worker (0: the worker's own setting; an orchestrator before it).
    heartbeat_s: float = 0.0
    # Answer to a Register: the orchestrator's instance.  A worker names its engines' links
    # after it, so that what a link queued for an orchestrator that has since restarted is
    # told apart, and dropped, by its successor.
    instance: str = ""


class ResolveModel(Msg, frozen=True, tag=True, kw_only=True):
    ref: str


class ModelInfo(Msg, frozen=True, tag=True, kw_only=True):
    ref: str
    path: str
    context_length: int | None
    params: dict[str, Any] = {}
    size_bytes: int = 0  # the file's, as registered: what a load on demand must find room for
    sha256: str = ""


# registry RPC -------------------------------------------------------------------------------
class RegistryCall(Msg, frozen=True, tag=True, kw_only=True):
    op: str  # "resolve", "list", "set_status"
    args: dict[str, Any] = {}


class RegistryReply(Msg, frozen=True, tag=True, kw_only=True):
    result: Any = None


Message = (
    Ping
    | Pong
    | StatsRequest
    | Stats
    | ListModels
    | ModelList
    | Infer
    | Chunk
    | Chunks
    | Started
    | Done
    | Embeddings
    | Tokens
    | Error
    | Cancel
    | Register
    | Heartbeat
    | Ack
    | ResolveModel
    | ModelInfo
    | RegistryCall
    | RegistryReply
    | Load
    | Unload
    | LoadFailed
    | ContextTooSmall
    | ManageModel
    | ModelPlaced
)


# What ends a request (the answer a relay passes on and forgets the request after).
FINAL = (Done, Embeddings, Tokens, Error)
# Answers that are not text: a request of another ``op`` than generate ends with one.
ANSWERS = (Embeddings, Tokens)


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    v: int
    id: str
    deadline: float
    traceparent: str
    msg: Message
    # Which dispatch of the request this is about (orchestrator -> worker, and the worker's
    # answers): a request sent again to the same worker is told apart from its earlier run,
    # whose end may arrive late.  0 everywhere else, and then left off the wire.
    run: int = 0


class _Unrun(msgspec.Struct, frozen=True, array_like=True):
    """An envelope without a run, as every message but a dispatch and its answers is sent
    (and as peers from before the field decode it)."""

    v: int
    id: str
    deadline: float
    traceparent: str
    msg: Message


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


class BadFrame(Exception):
    """A frame that is not a valid envelope of this protocol version."""


def float32_bytes(vector: list[float]) -> bytes:
    """A vector as :class:`Embeddings` carries it: little-endian float32."""
    values = array.array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def float32_list(data: bytes) -> list[float]:
    """A vector of :class:`Embeddings` as numbers."""
    values = array.array("f")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def new_id() -> str:
    return uuid.uuid4().hex


def encode(
    msg: Msg, request_id: str = "", deadline: float = 0.0, traceparent: str = "", run: int = 0
) -> bytes:
    if run:
        envelope = Envelope(PROTOCOL_VERSION, request_id, deadline, traceparent, msg, run)  # type: ignore[arg-type]
        return _encoder.encode(envelope)
    return _encoder.encode(_Unrun(PROTOCOL_VERSION, request_id, deadline, traceparent, msg))  # type: ignore[arg-type]


def reply(to: Envelope, msg: Msg) -> bytes:
    """Encode ``msg`` as an answer to ``to``: same request id, deadline, trace and run."""
    return encode(msg, to.id, to.deadline, to.traceparent, to.run)


def decode(frame: bytes) -> Envelope:
    if len(frame) > MAX_FRAME_BYTES:
        raise BadFrame(f"frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES} limit")
    try:
        envelope = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        # ValueError covers UnicodeDecodeError, which msgspec raises for invalid UTF-8 strings
        raise BadFrame(f"{type(exc).__name__}: {exc}") from None
    if envelope.v != PROTOCOL_VERSION:
        raise BadFrame(f"protocol version {envelope.v}, expected {PROTOCOL_VERSION}")
    return envelope


def expired(envelope: Envelope, now: float | None = None) -> bool:
    return envelope.deadline > 0 and (now or time.time()) > envelope.deadline
