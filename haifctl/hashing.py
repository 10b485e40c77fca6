"""Streaming sha256: model files are tens of gigabytes, so never read one whole."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from haifctl.files import open_regular

CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hash ``path`` in fixed-size chunks, calling ``progress(n_bytes)`` after each chunk."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    # refuses a FIFO or device (InvalidInput) instead of blocking on it or hashing it forever
    with os.fdopen(open_regular(path), "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            if progress is not None:
                progress(n)
    return digest.hexdigest()
