"""Where a model goes: sizes, keep-alive durations, label selectors and the placement choice.

Pure functions over small records, shared by the orchestrator (which decides), the worker (which
parses its own flags) and the benchmark (which times a decision over a thousand workers).  A
decision is one pass over the candidate workers: no daemon calls, no sorting of the whole table
unless an eviction is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from haifctl.errors import InvalidInput

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's five minutes
POLICIES = ("spread", "binpack")
KV_OVERHEAD = 1.1  # a model in memory: its file, plus compute buffers (a tenth is generous)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from ``8G``, ``512M``, ``1.5GiB`` or a plain number of bytes (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidInput(
            "invalid_size", f"{text!r} is not a size", "e.g. 8G, 512M, 1.5GiB or bytes"
        )
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def parse_memory(text: str) -> tuple[int, float]:
    """A worker's memory budget: bytes (``8G``: ``(bytes, 1.0)``) or a share of what is free
    when it starts (``50%``: ``(0, 0.5)``)."""
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise InvalidInput(
                "invalid_size",
                f"{text!r} is not a share of memory",
                "a percentage above 0 and at most 100, e.g. 50%",
            )
        return 0, percent / 100
    return parse_size(text), 1.0


def parse_keep_alive(value: object) -> float | None:
    """Seconds a model stays loaded once idle, as Ollama takes it: a number of seconds or a
    duration (``"5m"``, ``"30s"``, ``"1h"``); ``0`` unloads at once, any negative value keeps
    it loaded (None)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(
            "invalid_keep_alive",
            f"keep_alive: {value!r} is not a duration",
            'seconds, or a duration such as "5m"; 0 unloads after the request, -1 keeps it',
        )
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise InvalidInput(
                "invalid_keep_alive",
                f"keep_alive: {value!r} is not a duration",
                'seconds, or a duration such as "5m"; 0 unloads after the request, -1 keeps it',
            )
        seconds = float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]
    else:
        seconds = float(value)
    return None if seconds < 0 else seconds


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["gpu=h100", "zone=a"]`` (or one ``"gpu=h100,zone=a"``) as a mapping."""
    labels: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise InvalidInput(
                    "invalid_label", f"label {part!r} is not KEY=VALUE", "e.g. --label gpu=h100"
                )
            labels[key.strip()] = value.strip()
    return labels


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def estimate_bytes(file_bytes: int, kv_bytes: int = 0) -> int:
    """What loading a model will take: its weights as the file holds them, with some room for
    compute buffers, and its KV cache when known."""
    return int(file_bytes * KV_OVERHEAD) + kv_bytes


@dataclass
class Resident:
    """A model loaded on a candidate worker, as placement sees it."""

    ref: str
    size_bytes: int
    busy: int  # requests running on it (a busy model is never evicted)
    last_used: float  # monotonic; the least recently used idle model goes first
    pinned: bool = False  # waited for by a queue, or being loaded: not evictable either


@dataclass
class Candidate:
    """A worker that could take a model."""

    key: object  # whatever the caller identifies workers by
    name: str
    budget: int  # bytes it may fill with models (0: unknown, taken as unlimited)
    used: int  # bytes its models (and loads on their way) take
    load: float  # running / slots, for spreading
    labels: Mapping[str, str] = field(default_factory=dict)
    residents: list[Resident] = field(default_factory=list)

    @property
    def free(self) -> int:
        return (1 << 62) if self.budget <= 0 else self.budget - self.used


@dataclass
class Decision:
    """Where a load goes, what it evicts first, and why (for the span and the debug log)."""

    key: object | None
    name: str = ""
    evict: list[str] = field(default_factory=list)
    reason: str = ""
    seen: int = 0  # candidates looked at


def place(
    candidates: Iterable[Candidate],
    need: int,
    policy: str = "spread",
    selector: Mapping[str, str] | None = None,
) -> Decision:
    """Choose a worker for a model needing ``need`` bytes.

    Among workers whose labels match ``selector`` and with ``need`` free: the least loaded
    (spread) or the one the model fills most (binpack).  When none has room, the worker where
    evicting idle models (least recently used first, never a busy or pinned one) frees enough,
    with the fewest bytes evicted.  No worker at all: a decision without a key, whose reason
    names the memory needed and the most any worker has (or could free)."""
    selector = selector or {}
    best: Candidate | None = None
    best_score: tuple[float, ...] = ()
    fallback: tuple[int, Candidate, list[str]] | None = None  # (bytes evicted, worker, models)
    seen = matched = 0
    most_free = 0
    for c in candidates:
        seen += 1
        if selector and not matches(c.labels, selector):
            continue
        matched += 1
        free = c.free
        most_free = max(most_free, free)
        if free >= need:
            score = (c.load, -free) if policy == "spread" else (free - need, c.load)
            if best is None or score < best_score:
                best, best_score = c, score
            continue
        if best is not None:
            continue  # something fits without evicting: no need to look at evictions
        idle = sorted(
            (r for r in c.residents if not r.busy and not r.pinned), key=lambda r: r.last_used
        )
        freed, chosen = 0, []
        for resident in idle:
            if free + freed >= need:
                break
            freed += resident.size_bytes
            chosen.append(resident.ref)
        most_free = max(most_free, free + freed)
        if free + freed >= need and (fallback is None or freed < fallback[0]):
            fallback = (freed, c, chosen)
    if best is not None:
        why = "least loaded" if policy == "spread" else "fullest where it fits"
        return Decision(
            best.key,
            best.name,
            reason=f"{policy}: {why} of {matched} matching workers "
            f"({human_bytes(best.free)} free, load {best.load:.2f}, needs {human_bytes(need)})",
            seen=seen,
        )
    if fallback is not None:
        freed, c, chosen = fallback
        return Decision(
            c.key,
            c.name,
            evict=chosen,
            reason=f"no worker has {human_bytes(need)} free: evicting idle "
            f"{', '.join(chosen)} ({human_bytes(freed)}, least recently used) on {c.name}",
            seen=seen,
        )
    if not matched:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return Decision(
            None,
            reason=f"no worker has the labels {wanted}" if seen else "no worker can take it",
            seen=seen,
        )
    return Decision(
        None,
        reason=f"needs {human_bytes(need)} of memory; the most any worker has free, even "
        f"after unloading its idle models, is {human_bytes(most_free)}",
        seen=seen,
    )
