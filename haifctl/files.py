"""Files haifctl creates or reads with care: private directories and logs, and model files that
must be regular files.

haifctl's home holds the registry, API key hashes, the cluster's state (which names the registry
URL) and the daemons' logs, so what haifctl creates there is readable by its owner alone: folders
0700, log files 0600.  A model path is opened without blocking and checked to be a regular file
before anything reads it: opening a FIFO for reading would wait for a writer forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

from haifctl.errors import InvalidInput

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) if it does not exist; the folders haifctl creates
    this way are 0700.  A folder that already exists keeps the mode its owner gave it."""
    missing = []
    here = path
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    for folder in missing:
        with contextlib.suppress(OSError):
            folder.chmod(PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def open_log(path: Path) -> int:
    """Open (create) a log file for appending, 0600, and return its descriptor; a log file an
    older version left readable by others is made private too.  The caller closes it."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


# The line each daemon's log gets where a run of the cluster starts (`haifctl up`): `haifctl
# logs` shows the latest run by default, so an earlier failure is not reprinted as if it were new.
RUN_STARTED = "run started"


def write_run_marker(fd: int, daemon: str, run: float) -> None:
    """Mark, in a log opened with :func:`open_log`, where the run that started at ``run``
    (epoch seconds, the same for every daemon of one `haifctl up`) begins."""
    record = {"time": round(time.time(), 3), "level": "info", "daemon": daemon}
    record.update({"msg": RUN_STARTED, "run": run})
    os.write(fd, (json.dumps(record) + "\n").encode())


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate a log file a running daemon appends to, once it is over ``max_bytes``: its
    content moves to ``NAME.1`` (``NAME.1`` to ``NAME.2``..., ``keep`` of them kept) and the file
    is truncated in place.  The daemon keeps its descriptor: it writes with O_APPEND, so its next
    line lands at the start of the emptied file (a line written between the copy and the
    truncation is lost, as with logrotate's copytruncate)."""
    try:
        if max_bytes <= 0 or path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if keep <= 0:
        os.truncate(path, 0)
        return True
    rotated(path, keep).unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        if rotated(path, n).exists():
            rotated(path, n).replace(rotated(path, n + 1))
    target = rotated(path, 1)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    with open(path, "rb") as src, os.fdopen(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.truncate(path, 0)
    return True


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def not_a_file(path: Path, mode: int) -> InvalidInput:
    return InvalidInput(
        "not_a_file",
        f"{path} is {_kind(mode)}, not a regular file",
        "give the path of a .gguf model file",
    )


def open_regular(path: Path) -> int:
    """Open ``path`` for reading and return its descriptor, or raise ``InvalidInput`` unless it
    is a regular file (after symlinks).  Never blocks: the file is opened with O_NONBLOCK (which
    makes opening a FIFO return at once) and checked with fstat on the descriptor itself, so a
    file swapped for a FIFO in between is caught too.  Raises ``OSError`` as ``os.open`` does
    (FileNotFoundError, PermissionError...)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_a_file(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
