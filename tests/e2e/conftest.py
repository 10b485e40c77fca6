from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HAIFCTL = str(Path(sys.executable).parent / "haifctl")

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def haifctl(home: Path) -> Run:
    """Run the installed `haifctl` command as a user would, in the test's own home."""

    def run(
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        check_clean: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [HAIFCTL, *args],
            input=input,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=120,
        )
        if check_clean:
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    return run
