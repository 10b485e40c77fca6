"""The limits every gateway of a cluster enforces together: a token bucket and a concurrency cap
per client key, and the keys revoked.

Without Redis (the embedded default) :class:`LocalLimits` keeps them in the gateway's process,
as one gateway needs.  With ``HAIF_REDIS_URL`` several gateways share them: each admission is
one Lua script in Redis (rate and concurrency checked and taken atomically, on Redis's clock,
whichever gateway asks), and revoked key ids live in one Redis hash that every gateway reads
every half second.

The gateway's loop never waits on Redis.  :class:`Coordinator` hands admissions and releases to
a thread of its own over an inproc socket and reads the decisions from it; the thread sends
everything waiting as one pipeline (one round trip for a burst of requests).  When Redis fails
the thread decides with the local limits instead, logs it once, counts it, and probes Redis
until it answers again: no request fails because Redis is down.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    import redis

# Refusal reasons (the gateway's error codes).
RATE_LIMITED = "rate_limited"
TOO_MANY_CONCURRENT = "too_many_concurrent"
CONCURRENT_RETRY_S = 1.0  # what a client capped on concurrency is told to wait

REVOKED_POLL_S = 0.5  # a revocation reaches every gateway within this (plus one round trip)
PROBE_EVERY_S = 0.5  # while Redis is away, how often the thread tries it again
REDIS_TIMEOUT_S = 0.5  # one Redis round trip, at most, before the thread decides locally
MAX_PENDING_RELEASES = 10_000  # releases kept for a Redis that comes back; older ones expire

# KEYS: the key's bucket (hash), its requests in flight (sorted set, scored by expiry).
# ARGV: rate per second, burst, concurrency cap (0: none), request member, seconds it may hold
# its slot (a gateway that dies holding slots frees them when they expire).
# Returns {1, ''} admitted, or {0, reason, seconds to wait} (numbers as strings: Redis would
# truncate a Lua number to an integer).  Redis 5+ replicates a script's effects, so reading
# TIME before writing is allowed.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then
    return {0, 'too_many_concurrent', ARGV[6]}
  end
end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ttl = math.ceil(burst / rate * 1000) + 1000
if tokens < 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, 'rate_limited', tostring((1 - tokens) / rate)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl)
if cap > 0 then
  local hold = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now + hold, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(hold * 1000) + 1000)
end
return {1, '', '0'}
"""


@dataclass(frozen=True)
class KeyLimits:
    """What one client key may do: ``rate_per_s`` requests a second with bursts of ``burst``,
    and at most ``max_concurrent`` in flight (0: no cap)."""

    rate_per_s: float = 50.0
    burst: float = 100.0
    max_concurrent: int = 0


@dataclass(frozen=True)
class Decision:
    """An admission's answer: ``wait_s`` 0 and no ``reason`` when admitted."""

    request_id: str
    wait_s: float = 0.0
    reason: str = ""

    @property
    def admitted(self) -> bool:
        return not self.reason


class TokenBucket:
    """Per-key token buckets in this process (``rate`` tokens a second, at most ``burst``)."""

    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """0.0 if allowed, else the seconds until a token is available."""
        if key not in self.buckets and len(self.buckets) >= self.MAX_KEYS:
            # Forget clients whose buckets have refilled: they are indistinguishable from new
            # ones, and keeping them would let many identities grow this without bound.
            full_after = self.burst / self.rate
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < full_after}
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class LocalLimits:
    """The limits in this process: what a lone gateway enforces, and what any gateway falls
    back to without Redis.  Thread-safe: the coordination thread decides here while Redis is
    away.  Its tables hold only keys with tokens spent or requests in flight (bounded)."""

    def __init__(self, limits: KeyLimits) -> None:
        self.limits = limits
        self.bucket = TokenBucket(limits.rate_per_s, limits.burst)
        self.in_flight: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def admit(self, request_id: str, key: str, now: float) -> Decision:
        with self.lock:
            held = self.in_flight.get(key)
            cap = self.limits.max_concurrent
            if cap > 0 and held is not None and len(held) >= cap:
                return Decision(request_id, CONCURRENT_RETRY_S, TOO_MANY_CONCURRENT)
            wait = self.bucket.take(key, now)
            if wait > 0:
                return Decision(request_id, wait, RATE_LIMITED)
            if cap > 0:
                self.in_flight.setdefault(key, set()).add(request_id)
            return Decision(request_id)

    def release(self, request_id: str, key: str) -> None:
        with self.lock:
            held = self.in_flight.get(key)
            if held is not None:
                held.discard(request_id)
                if not held:
                    del self.in_flight[key]


def redis_client(url: str, timeout: float = REDIS_TIMEOUT_S) -> redis.Redis:
    """A client that fails fast (no retries, short timeouts): a caller with a fallback wants to
    know at once that Redis is away, not after redis-py's own retries."""
    import redis as redis_py
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis_py.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        decode_responses=True,
    )


def _checked_client(url: str) -> redis.Redis:
    from haifctl.config import mask_url
    from haifctl.errors import InvalidInput

    try:
        return redis_client(url)
    except ValueError as exc:
        raise InvalidInput(
            "bad_redis_url",
            f"HAIF_REDIS_URL {mask_url(url)!r} is not a Redis URL: {mask_url(str(exc), url)}",
            "use redis://[:PASSWORD@]HOST:6379/DB, or leave it empty for local limits",
        ) from None


def revoked_hash(prefix: str) -> str:
    return f"{prefix}:revoked"


def revoke_shared(url: str, prefix: str, key_id: str) -> None:
    """Record a revoked key id where every gateway sharing ``url`` sees it within a second.
    Raises :class:`haifctl.errors.Unavailable` when Redis cannot be reached."""
    import redis as redis_py

    from haifctl.config import mask_url
    from haifctl.errors import Unavailable

    client = _checked_client(url)
    try:
        client.hset(revoked_hash(prefix), key_id, f"{time.time():.3f}")
    except redis_py.RedisError as exc:
        raise Unavailable(
            "redis_unreachable",
            f"cannot record the revocation in Redis at {mask_url(url)}: {mask_url(str(exc), url)}",
            "nothing was revoked; check HAIF_REDIS_URL and that Redis runs, then try again",
        ) from None
    finally:
        client.close()


class Coordinator:
    """The gateway's limits: local, or shared through Redis by a thread of its own.

    :meth:`admit` answers at once (a :class:`Decision`) when the limits are local; with Redis
    it answers None, and the decision comes later from :meth:`decisions` once :attr:`socket`
    is readable (the gateway watches it in its loop).  Every admitted request must be
    :meth:`release`-d once it ends, to give its concurrency slot back.
    """

    def __init__(
        self,
        limits: KeyLimits,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        redis_url: str = "",
        prefix: str = "haif",
        on_change: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self.local = LocalLimits(limits)
        self.redis_url = redis_url
        self.prefix = prefix
        # on_change(shared, why): called from the coordination thread when Redis goes away
        # or comes back (the gateway logs it and sets its metrics)
        self.on_change = on_change
        self.shared = False  # Redis answers: limits are shared (read by the gateway's thread)
        self.revoked_ids: frozenset[str] = frozenset()  # swapped whole, never mutated
        self.fallbacks = 0
        self.socket: zmq.Socket[bytes] | None = None
        self.thread: threading.Thread | None = None
        # admitted here because the thread's pipe was full: their release stays here too
        self.local_ids: set[str] = set()
        if redis_url:
            client = _checked_client(redis_url)  # a mistyped URL stops the gateway here
            address = f"inproc://coordination-{uuid.uuid4().hex}"
            self.socket = _pair(ctx)
            self.socket.bind(address)
            self.worker = _RedisWorker(self, ctx, address, client)
            self.thread = threading.Thread(target=self.worker.run, name="coordination", daemon=True)
            self.thread.start()

    @property
    def mode(self) -> str:
        """``local`` (no Redis configured), ``shared``, or ``local-fallback`` (Redis away)."""
        if not self.redis_url:
            return "local"
        return "shared" if self.shared else "local-fallback"

    def admit(self, request_id: str, key: str, hold_s: float) -> Decision | None:
        if self.socket is None:
            return self.local.admit(request_id, key, time.monotonic())
        try:
            self.socket.send_multipart(
                [b"A", request_id.encode(), key.encode(), repr(hold_s).encode()], zmq.NOBLOCK
            )
        except zmq.ZMQError:  # the thread is that far behind: decide here rather than wait
            decision = self.local.admit(request_id, key, time.monotonic())
            if decision.admitted and self.limits.max_concurrent > 0:
                self.local_ids.add(request_id)
            return decision
        return None

    def release(self, request_id: str, key: str) -> None:
        if self.socket is None or request_id in self.local_ids:
            self.local_ids.discard(request_id)
            self.local.release(request_id, key)
            return
        if self.limits.max_concurrent > 0:  # nothing to give back without a cap
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart([b"R", request_id.encode(), key.encode()], zmq.NOBLOCK)

    def decisions(self) -> Iterator[Decision]:
        """Every decision waiting on :attr:`socket`, without blocking."""
        assert self.socket is not None
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            yield Decision(frames[0].decode(), float(frames[1]), frames[2].decode())

    def revoked(self, key: str) -> bool:
        return key in self.revoked_ids

    def close(self) -> None:
        if self.thread is not None:
            self.worker.stopping = True
            self.thread.join(timeout=2 * REDIS_TIMEOUT_S + 1)
        if self.socket is not None:
            self.socket.close(linger=0)


def _pair(ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)  # a burst of admissions waits here, not refused
    sock.setsockopt(zmq.RCVHWM, 100_000)
    return sock


class _RedisWorker:
    """The coordination thread: the only user of the Redis connection."""

    def __init__(
        self,
        owner: Coordinator,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        client: redis.Redis,
    ) -> None:
        self.owner = owner
        self.ctx = ctx
        self.address = address
        self.stopping = False
        self.client: redis.Redis | None = client
        self.sha = ""
        self.next_probe = 0.0
        self.next_revoked = 0.0
        # where each admitted request holds its concurrency slot: True in Redis, False here
        self.in_redis: dict[str, bool] = {}
        # releases of Redis slots that failed: sent when Redis is back (the slots would expire
        # at their deadline anyway; this gives them back sooner)
        self.unreleased: deque[tuple[str, str]] = deque(maxlen=MAX_PENDING_RELEASES)

    def run(self) -> None:
        sock = _pair(self.ctx)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        self.probe(time.monotonic())
        try:
            while not self.stopping:
                ready = poller.poll(int(REVOKED_POLL_S * 1000 / 5))
                ops: list[list[bytes]] = []
                if ready:
                    while len(ops) < 1000:
                        try:
                            ops.append(sock.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                now = time.monotonic()
                if ops:
                    for decision in self.handle(ops):
                        sock.send_multipart(
                            [
                                decision.request_id.encode(),
                                repr(decision.wait_s).encode(),
                                decision.reason.encode(),
                            ]
                        )
                try:
                    if not self.owner.shared and now >= self.next_probe:
                        self.probe(now)
                    elif self.owner.shared and now >= self.next_revoked:
                        self.refresh_revoked(now)
                except Exception as exc:  # whatever it was, the thread goes on deciding
                    self.went_away(exc)
        finally:
            sock.close(linger=0)
            if self.client is not None:
                self.client.close()

    # Redis's health ----------------------------------------------------------------------------
    def probe(self, now: float) -> None:
        """Try Redis; on success load the script, read the revoked keys, share again."""
        import redis as redis_py

        assert self.client is not None
        self.next_probe = now + PROBE_EVERY_S
        try:
            self.sha = str(self.client.script_load(ADMIT_LUA))
            self.flush_releases()
        except redis_py.RedisError as exc:
            if self.owner.shared or self.owner.fallbacks == 0:
                self.went_away(exc)
            return
        self.owner.shared = True
        self.refresh_revoked(now)
        if self.owner.on_change is not None and self.owner.shared:
            self.owner.on_change(True, "redis answers")

    def went_away(self, exc: BaseException) -> None:
        self.owner.shared = False
        self.owner.fallbacks += 1
        self.next_probe = time.monotonic() + PROBE_EVERY_S
        if self.owner.on_change is not None:
            self.owner.on_change(False, f"{type(exc).__name__}: {exc}")

    def refresh_revoked(self, now: float) -> None:
        import redis as redis_py

        assert self.client is not None
        self.next_revoked = now + REVOKED_POLL_S
        try:
            ids = self.client.hkeys(revoked_hash(self.owner.prefix))
        except redis_py.RedisError as exc:
            self.went_away(exc)
            return
        self.owner.revoked_ids = frozenset(str(i) for i in ids)

    def flush_releases(self) -> None:
        assert self.client is not None
        if not self.unreleased:
            return
        pipe = self.client.pipeline(transaction=False)
        for request_id, key in self.unreleased:
            pipe.zrem(self.key(key, "inflight"), request_id)
        pipe.execute()
        self.unreleased.clear()

    # admissions and releases -------------------------------------------------------------------
    def key(self, client_key: str, kind: str) -> str:
        return f"{self.owner.prefix}:{kind}:{client_key}"

    def handle(self, ops: list[list[bytes]]) -> list[Decision]:
        """Answer every admission in ``ops`` (shared while Redis answers, local otherwise) and
        give back every released slot where it was taken."""
        import redis as redis_py
        from redis.exceptions import NoScriptError

        if self.owner.shared:
            try:
                return self.shared(ops)
            except NoScriptError:  # Redis restarted between two probes: load it again
                try:
                    assert self.client is not None
                    self.sha = str(self.client.script_load(ADMIT_LUA))
                    return self.shared(ops)
                except redis_py.RedisError as exc:
                    self.went_away(exc)
            except redis_py.RedisError as exc:
                self.went_away(exc)
            except Exception as exc:  # never leave an admission unanswered
                self.went_away(exc)
        return self.locally(ops)

    def shared(self, ops: list[list[bytes]]) -> list[Decision]:
        """One pipeline for every op; nothing is recorded here unless it all went through
        (a failure sends the same ops to :meth:`locally`)."""
        assert self.client is not None
        limits = self.owner.limits
        pipe = self.client.pipeline(transaction=False)
        local_releases: list[tuple[str, str]] = []
        in_pipe: list[list[bytes]] = []  # the ops whose answers the pipeline returns, in order
        for op in ops:
            request_id, key = op[1].decode(), op[2].decode()
            if op[0] == b"A":
                in_pipe.append(op)
                pipe.evalsha(
                    self.sha,
                    2,
                    self.key(key, "rate"),
                    self.key(key, "inflight"),
                    repr(limits.rate_per_s),
                    repr(limits.burst),
                    str(limits.max_concurrent),
                    request_id,
                    op[3].decode(),
                    repr(CONCURRENT_RETRY_S),
                )
            elif self.in_redis.get(request_id, True):
                in_pipe.append(op)
                pipe.zrem(self.key(key, "inflight"), request_id)
            else:
                local_releases.append((request_id, key))
        results: list[Any] = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                raise result
        for request_id, key in local_releases:
            self.in_redis.pop(request_id, None)
            self.owner.local.release(request_id, key)
        decisions = []
        for op, result in zip(in_pipe, results, strict=True):
            request_id = op[1].decode()
            if op[0] != b"A":
                self.in_redis.pop(request_id, None)
                continue
            ok, reason, wait = result
            if int(ok):
                if limits.max_concurrent > 0:
                    self.in_redis[request_id] = True
                decisions.append(Decision(request_id))
            else:
                decisions.append(Decision(request_id, float(wait), str(reason)))
        return decisions

    def locally(self, ops: list[list[bytes]]) -> list[Decision]:
        decisions = []
        now = time.monotonic()
        for op in ops:
            request_id, key = op[1].decode(), op[2].decode()
            if op[0] == b"A":
                decision = self.owner.local.admit(request_id, key, now)
                if decision.admitted and self.owner.limits.max_concurrent > 0:
                    self.in_redis[request_id] = False
                decisions.append(decision)
            elif self.in_redis.pop(request_id, True):
                self.unreleased.append((request_id, key))
            else:
                self.owner.local.release(request_id, key)
        return decisions
