"""Per-request usage in the registry database: one row per finished request, written in
batches by the registry daemon (the gateway collects them), summed by ``haifctl usage``.

The SQL runs unchanged on SQLite and Postgres.  Rows carry an id made by the gateway that saw
the request, so a batch sent twice (its answer was lost) is stored once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from haifctl.errors import InvalidInput
from haifctl.registry.backends import Backend

TABLE = "request_usage"
BATCH_ROWS = 500  # rows per INSERT: 5,500 parameters, well under both databases' limits
GROUPS = {"key": "key_id", "model": "model"}
Group = Literal["key", "model"]


class UsageRow(msgspec.Struct, frozen=True, array_like=True):
    """One finished request, as the gateway reports it (a list on the wire)."""

    id: str  # unique per row: the gateway's instance and a sequence number
    finished_at: float  # Unix time
    request_id: str
    key_id: str
    model: str
    worker: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    duration_ms: float
    outcome: str  # "ok" or the error code


class UsageTotal(msgspec.Struct, frozen=True, kw_only=True):
    """The sums over one group (a key, a model, or everything: ``name`` "all")."""

    name: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    avg_ttft_ms: float | None
    avg_duration_ms: float
    first: str
    last: str


def iso(ts: float) -> str:
    """A fixed-width UTC timestamp, so that text order is time order on both databases."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def record(backend: Backend, rows: Sequence[UsageRow]) -> int:
    """Store ``rows`` in one transaction; a row already stored is skipped.  Returns how many
    were new."""
    columns = UsageRow.__struct_fields__
    stored = 0
    with backend.transaction():
        for start in range(0, len(rows), BATCH_ROWS):
            chunk = rows[start : start + BATCH_ROWS]
            params: dict[str, Any] = {}
            values = []
            for i, row in enumerate(chunk):
                names = []
                for column in columns:
                    value = getattr(row, column)
                    params[f"{column}{i}"] = iso(value) if column == "finished_at" else value
                    names.append(f":{column}{i}")
                values.append(f"({', '.join(names)})")
            stored += backend.execute(
                f"INSERT INTO {TABLE} ({', '.join(columns)}) VALUES {', '.join(values)} "
                "ON CONFLICT (id) DO NOTHING",
                params,
            )
    return stored


def totals(backend: Backend, since_s: float | None, by: Group | None) -> list[UsageTotal]:
    """Sums per key or per model (or one for everything) over the last ``since_s`` seconds
    (None: every row kept), the busiest first."""
    if by is not None and by not in GROUPS:
        raise InvalidInput("invalid_group", f"cannot group usage by {by!r}", "use key or model")
    name = GROUPS[by] if by else "'all'"
    group = f"GROUP BY {name} ORDER BY COUNT(*) DESC, {name}" if by else ""
    where, params = "", {}
    if since_s is not None:
        where = "WHERE finished_at >= :since"
        params["since"] = (datetime.now(UTC) - timedelta(seconds=since_s)).isoformat(
            timespec="microseconds"
        )
    rows = backend.query(
        f"""
        SELECT {name} AS name, COUNT(*) AS requests,
               SUM(CASE WHEN outcome = 'ok' THEN 0 ELSE 1 END) AS errors,
               SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,
               AVG(ttft_ms) AS avg_ttft_ms, AVG(duration_ms) AS avg_duration_ms,
               MIN(finished_at) AS first, MAX(finished_at) AS last
        FROM {TABLE} {where}
        {group}
        """,
        params,
    )
    return [  # without a group and without rows, the one row is all NULLs and a count of 0
        UsageTotal(
            name=str(r["name"]),
            requests=int(r["requests"]),
            errors=int(r["errors"] or 0),
            prompt_tokens=int(r["prompt_tokens"] or 0),
            completion_tokens=int(r["completion_tokens"] or 0),
            avg_ttft_ms=None if r["avg_ttft_ms"] is None else round(float(r["avg_ttft_ms"]), 3),
            avg_duration_ms=round(float(r["avg_duration_ms"] or 0.0), 3),
            first=str(r["first"]),
            last=str(r["last"]),
        )
        for r in rows
        if int(r["requests"])
    ]


def prune(backend: Backend, older_than_s: float) -> int:
    """Delete the rows of requests that finished more than ``older_than_s`` seconds ago."""
    cutoff = (datetime.now(UTC) - timedelta(seconds=older_than_s)).isoformat(
        timespec="microseconds"
    )
    with backend.transaction():
        return backend.execute(
            f"DELETE FROM {TABLE} WHERE finished_at < :cutoff", {"cutoff": cutoff}
        )


_DURATION = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> float | None:
    """``90s``, ``30m``, ``1h``, ``7d``, ``2w`` (a bare number is seconds) in seconds; ``all``
    is None (no limit)."""
    if text.strip().lower() == "all":
        return None
    match = _DURATION.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise InvalidInput(
            "invalid_duration",
            f"--since {text!r} is not a duration",
            "use a number with s, m, h, d or w (e.g. 1h, 7d), or all",
        )
    return float(match.group(1)) * _UNIT_S[match.group(2).lower()]
