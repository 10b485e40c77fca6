"""--flash-attn / HAIF_FLASH_ATTN: a clear error for a value that is not auto, on or off, in a
worker and in-process; "on" serves as "auto" does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.e2e.conftest import HAIFCTL


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAIFCTL, *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HAIF_HOME": str(home), **env},
    )


def test_a_worker_refuses_an_unknown_flash_attn(tmp_path: Path) -> None:
    proc = run(tmp_path, "worker", "--orchestrator", "tcp://127.0.0.1:9", "--flash-attn", "fast")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "error: flash attention 'fast' is not one of auto, on, off"
    assert lines[1] == "hint: set --flash-attn or HAIF_FLASH_ATTN to auto, on or off"


def test_in_process_inference_follows_haif_flash_attn(tmp_path: Path) -> None:
    args = ("infer", "--local", "--max-tokens", "6", "Once upon a time")
    refused = run(tmp_path, *args, HAIF_FLASH_ATTN="fast")
    assert refused.returncode == 2, refused.stderr
    assert "flash attention must be one of auto, on, off, not 'fast'" in refused.stderr
    served = run(tmp_path, *args, HAIF_FLASH_ATTN="on")
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip()
