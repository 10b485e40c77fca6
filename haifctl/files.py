"""Files haifctl creates or reads with care: private directories and logs, and model files that
must be regular files.

haifctl's home holds the registry, API key hashes, the cluster's state (which names the registry
URL) and the daemons' logs, so what haifctl creates there is readable by its owner alone: folders
0700, log files 0600.  A model path is opened without blocking and checked to be a regular file
before anything reads it: opening a FIFO for reading would wait for a writer forever.
"""

from __future__ import annotations

import contextlib
import os
import stat
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
