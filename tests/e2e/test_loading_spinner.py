"""`haifctl infer` shows the model it loads, and its size, on a terminal's stderr while it loads;
never in piped output."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from tests.e2e.conftest import HAIFCTL, Run


def in_a_terminal(home: Path, *args: str) -> tuple[int, str]:
    """Run haifctl with a pseudo-terminal for stdin, stdout and stderr; all it wrote, raw."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [HAIFCTL, *args],
        stdin=child,
        stdout=child,
        stderr=child,
        env={**os.environ, "HAIF_HOME": str(home), "COLUMNS": "120"},
    )
    os.close(child)
    out = b""
    end = time.monotonic() + 120
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child has closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(10), out.decode(errors="replace")
    finally:
        os.close(main)


def test_a_spinner_names_the_model_while_it_loads(haifctl: Run, home: Path) -> None:
    args = ("infer", "Once upon a time", "-n", "8", "--seed", "5", "--local")
    piped = haifctl(*args)
    assert piped.returncode == 0, piped.stderr
    assert "loading" not in piped.stderr + piped.stdout  # not a terminal: no spinner
    text = piped.stdout.strip()
    assert text

    code, shown = in_a_terminal(home, *args)
    assert code == 0, shown
    assert "loading stories260K:1 (1.2 MB)" in shown
    # the spinner's line is erased before the first token, and the text follows it
    spinner_at = shown.rindex("loading stories260K:1")
    erased_at = shown.index("\x1b[2K", spinner_at)
    assert shown.index(text[:12], erased_at) > erased_at
