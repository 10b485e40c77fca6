"""`haifctl logs`: the daemons' logs, merged by time, one readable line per event.

Each daemon writes JSON lines to ``HOME/logs/NAME.log`` (rotated by the supervisor to
``NAME.log.1``, ``NAME.log.2``...); ``haifctl up`` marks in each where its run starts.  This
command reads them back: by default the latest run of every daemon, merged by time.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from haifctl.commands._shared import state, stderr, stdout
from haifctl.daemon.state import log_dir
from haifctl.errors import InvalidInput
from haifctl.files import RUN_STARTED, rotated

LEVELS = ("debug", "info", "warning", "error", "critical")
STYLES = {
    "debug": "dim",
    "info": "green",
    "warning": "yellow",
    "error": "bold red",
    "critical": "bold red reverse",
}
ROTATED_KEPT_MAX = 100  # rotated files looked for per daemon, at most
FOLLOW_POLL_S = 0.2  # follow mode's polling interval
_TRACEBACK = re.compile(r"^(Traceback \(most recent call last\)|\w+(Error|Exception)\b)")


@dataclass(order=True)
class Event:
    """One line of a log: a JSON record, or a line something else wrote (a traceback,
    llama.cpp's own output), placed at the time of the record before it."""

    time: float
    seq: int  # keeps a file's own order among events of the same time
    daemon: str = field(compare=False)
    level: str = field(compare=False)
    msg: str = field(compare=False)
    fields: dict[str, Any] = field(compare=False, default_factory=dict)
    raw: str = field(compare=False, default="")
    is_json: bool = field(compare=False, default=True)

    @property
    def run_start(self) -> bool:
        return self.is_json and self.msg == RUN_STARTED

    def as_json(self) -> str:
        if self.is_json:
            return self.raw
        record = {"time": self.time, "level": self.level, "daemon": self.daemon, "msg": self.msg}
        return json.dumps({**record, "raw": True})


class Reader:
    """Turns one daemon's lines into events, remembering the last time and level seen."""

    def __init__(self, daemon: str, start: float) -> None:
        self.daemon = daemon
        self.last_time = start
        self.last_level = "info"
        self.seq = 0

    def event(self, line: str) -> Event | None:
        line = line.rstrip("\n")
        if not line.strip():
            return None
        self.seq += 1
        record: Any = None
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
        if isinstance(record, dict) and isinstance(record.get("time"), int | float):
            self.last_time = float(record["time"])
            level = str(record.get("level", "info")).lower()
            self.last_level = level
            extra = {k: v for k, v in record.items() if k not in ("time", "level", "daemon", "msg")}
            return Event(
                self.last_time,
                self.seq,
                self.daemon,
                level,
                str(record.get("msg", "")),
                extra,
                line,
            )
        # a traceback's first and last lines say error, the indented ones between keep it
        if _TRACEBACK.match(line):
            level = "error"
        elif line[:1].isspace():
            level = self.last_level
        else:
            level = "info"
        self.last_level = level
        return Event(self.last_time, self.seq, self.daemon, level, line, {}, line, False)


def _files(path: Path) -> list[Path]:
    """A daemon's log files, oldest first: NAME.log.N ... NAME.log.1, NAME.log."""
    older = []
    for n in range(1, ROTATED_KEPT_MAX + 1):
        if not rotated(path, n).exists():
            break
        older.append(rotated(path, n))
    return [*reversed(older), path]


def read_daemon(path: Path, whole: bool) -> tuple[list[Event], int]:
    """A daemon's events: from its latest run's start, or (``whole``) all that is kept; and how
    many bytes of the current file were read (where following it starts)."""
    files = _files(path)
    chosen: list[list[str]] = []
    read = 0
    for f in reversed(files):  # newest first: stop at the file holding the latest run's start
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            continue
        if f == path:
            data = data[: data.rfind(b"\n") + 1]  # a line being written is followed, not read
            read = len(data)
        lines = data.decode(errors="replace").splitlines()
        chosen.insert(0, lines)
        if not whole and any(RUN_STARTED in line for line in lines):
            break
    try:
        start = files[0].stat().st_mtime if chosen else 0.0
    except FileNotFoundError:
        start = 0.0
    reader = Reader(path.name.removesuffix(".log"), start)
    events = [e for lines in chosen for line in lines if (e := reader.event(line)) is not None]
    if not whole:
        starts = [i for i, e in enumerate(events) if e.run_start]
        if starts:
            events = events[starts[-1] :]
    return events, read


def parse_since(value: str, now: float) -> float:
    """``30s``, ``10m``, ``2h``, ``1d`` ago; or a time: ``14:05``, ``14:05:30``, or an ISO
    date-time (``2026-11-29T14:05``), in local time unless it names its zone."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return now - float(match.group(1)) * unit
    for fmt in ("%H:%M", "%H:%M:%S"):
        try:
            clock = datetime.strptime(value.strip(), fmt).time()
        except ValueError:
            continue
        return datetime.combine(datetime.fromtimestamp(now).date(), clock).timestamp()
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise InvalidInput(
            "invalid_since",
            f"--since {value!r} is not a duration or a time",
            "e.g. --since 10m, --since 2h, --since 14:05, --since 2026-11-29T14:05",
        ) from None


def _stamp(t: float, with_date: bool) -> str:
    local = datetime.fromtimestamp(t)
    return local.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S") + (
        f".{local.microsecond // 1000:03d}"
    )


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return json.dumps(text) if (" " in text or not text) and isinstance(v, str) else text


def render(event: Event, width: int, with_date: bool) -> Text:
    """One readable line: local time, daemon, level (coloured on a terminal), message, fields.
    Built as Text, never parsed as markup: a log line is data."""
    line = Text()
    line.append(_stamp(event.time, with_date), style="dim")
    line.append(" ")
    line.append(f"{event.daemon:<{width}}", style="cyan")
    line.append(" ")
    line.append(f"{event.level.upper():<7}", style=STYLES.get(event.level, ""))
    line.append(" ")
    line.append(event.msg, style="" if event.is_json else "dim")
    if event.fields:
        line.append("  ")
        line.append(" ".join(f"{k}={_value(v)}" for k, v in event.fields.items()), style="dim")
    return line


class Printer:
    def __init__(self, as_json: bool, width: int, with_date: bool) -> None:
        self.as_json = as_json
        self.width = width
        self.with_date = with_date
        self.console: Console = stdout()

    def __call__(self, events: Iterable[Event]) -> None:
        for event in events:
            if self.as_json:
                sys.stdout.write(event.as_json() + "\n")
            else:
                self.console.print(render(event, self.width, self.with_date))
        sys.stdout.flush()


def complete_daemons(ctx: Any, incomplete: str) -> list[str]:
    """Shell completion: the daemons that have a log in this home."""
    try:
        home = state(ctx).settings().home
    except Exception:  # completion must never fail loudly
        return []
    names = sorted(p.name.removesuffix(".log") for p in log_dir(home).glob("*.log"))
    return [n for n in names if n.startswith(incomplete)]


def logs(
    ctx: typer.Context,
    daemons: Annotated[
        list[str] | None,
        typer.Argument(
            help="Daemons to show: registry, orchestrator, gateway (gateway-N), bridge, "
            "worker-N, supervisor (default: all).",
            show_default=False,
            autocompletion=complete_daemons,
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines, from every daemon.")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=0, help="Events of history to show (the last N).")
    ] = 50,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only events since a duration ago (30s, 10m, 2h, 1d) or a local time "
            "(14:05, 2026-11-29T14:05); looks past the latest run.",
            show_default=False,
        ),
    ] = None,
    level: Annotated[
        str | None,
        typer.Option(
            "--level",
            help="Only events at this level or above: debug, info, warning, error.",
            show_default=False,
        ),
    ] = None,
    all_runs: Annotated[
        bool, typer.Option("--all", help="Every run kept in the files, not just the latest.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the raw JSON lines (merged by time).")
    ] = False,
) -> None:
    """Show the daemons' logs, merged by time: the latest run (since `haifctl up`) by default.

    One line per event: local time, daemon, level and message, then the event's fields; the
    level is coloured on a terminal. Lines that are not JSON (a traceback) keep their place.
    Log files are rotated by size (HAIF_LOG_MAX_BYTES, HAIF_LOG_KEEP older files kept).

    Examples:

      haifctl logs

      haifctl logs worker-1 gateway -n 200

      haifctl logs -f --level warning

      haifctl logs --since 10m --json | jq .msg
    """
    directory = log_dir(state(ctx).settings().home)
    known = sorted(p.name.removesuffix(".log") for p in directory.glob("*.log"))
    names = list(dict.fromkeys(daemons or known))
    for name in names:
        if name not in known:
            raise InvalidInput(
                "unknown_daemon",
                f"no log for {name!r}",
                f"logs: {', '.join(known) or f'none yet in {directory}'}",
            )
    floor = _level(level)
    now = time.time()
    start = parse_since(since, now) if since is not None else None
    whole = all_runs or start is not None
    if not names:
        stdout().print(f"no logs yet in {directory}", markup=False)
        if not follow:
            return

    def keep(event: Event) -> bool:
        if start is not None and event.time < start:
            return False
        return LEVELS.index(event.level) >= floor if event.level in LEVELS else True

    read = {n: read_daemon(directory / f"{n}.log", whole) for n in names}
    history = [e for e in heapq.merge(*(events for events, _ in read.values())) if keep(e)]
    shown = history[-lines:] if lines else []
    width = max((len(n) for n in [*names, "orchestrator"]), default=12)
    today = datetime.fromtimestamp(now).date()
    with_date = any(datetime.fromtimestamp(e.time).date() != today for e in shown)
    err = stderr()
    if err.is_terminal and not as_json:
        what = "every run kept" if all_runs else "the latest run of each daemon"
        if start is not None:
            what = f"since {_stamp(start, True)}"
        err.print(
            f"[dim]{directory}: {what}, {len(shown)} of {len(history)} events"
            + (f" at {LEVELS[floor]} or above" if floor else "")
            + (" (--all for earlier runs, --since for a time window)" if not whole else "")
            + "[/dim]"
        )
    printer = Printer(as_json, width, with_date)
    printer(shown)
    if follow:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends following, quietly
            _follow(directory, daemons, printer, keep, {n: size for n, (_, size) in read.items()})


def _level(level: str | None) -> int:
    if level is None:
        return 0
    name = {"warn": "warning"}.get(level.lower(), level.lower())
    if name not in LEVELS:
        raise InvalidInput(
            "invalid_level", f"unknown level {level!r}", "one of: " + ", ".join(LEVELS[:4])
        )
    return LEVELS.index(name)


@dataclass
class _Tail:
    path: Path
    reader: Reader
    position: int = 0
    inode: int = 0
    partial: str = ""


def _follow(
    directory: Path,
    daemons: list[str] | None,
    printer: Printer,
    keep: Any,
    read: dict[str, int],
) -> None:
    """Print what every daemon's log gains past what was ``read`` (bytes of each file), merged
    by time within each poll; a file that is rotated (truncated) is read again from its start,
    a daemon whose log appears later is added."""
    tails: dict[str, _Tail] = {}

    def scan() -> None:
        for path in sorted(directory.glob("*.log")) if directory.is_dir() else []:
            name = path.name.removesuffix(".log")
            if name in tails or (daemons and name not in daemons):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            tail = _Tail(path, Reader(name, time.time()), inode=st.st_ino)
            tail.position = min(read.get(name, 0), st.st_size)
            tails[name] = tail

    while True:
        scan()
        batch: list[Event] = []
        for tail in tails.values():
            batch.extend(_read_new(tail))
        batch.sort()
        printer(e for e in batch if keep(e))
        if not batch:
            time.sleep(FOLLOW_POLL_S)


def _read_new(tail: _Tail) -> Iterator[Event]:
    try:
        st = tail.path.stat()
    except FileNotFoundError:
        return
    if st.st_ino != tail.inode or st.st_size < tail.position:
        tail.inode, tail.position, tail.partial = st.st_ino, 0, ""  # rotated: from the start
    if st.st_size == tail.position:
        return
    with tail.path.open("rb") as fh:
        fh.seek(tail.position)
        data = fh.read()
    tail.position += len(data)
    text = tail.partial + data.decode(errors="replace")
    *complete, tail.partial = text.split("\n")
    for line in complete:
        event = tail.reader.event(line)
        if event is not None:
            yield event
