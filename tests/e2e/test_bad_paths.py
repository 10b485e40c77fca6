"""A model path that is not a regular file (a FIFO, a device, a directory) is refused at once
with one `error:` line, a hint and exit code 2; it used to hang `models register` and `infer`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import HAIFCTL


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run haifctl; a hang fails the test (subprocess.run kills it on TimeoutExpired)."""
    return subprocess.run(
        [HAIFCTL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=os.environ.copy(),
    )


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    os.mkfifo(path)
    return path


def assert_refused(proc: subprocess.CompletedProcess[str], path: Path, kind: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {path} is {kind}, not a regular file", proc.stderr
    assert lines[1].startswith("hint: ")
    assert len(lines) == 2
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("models", "register", "{path}"),
        ("models", "register", "{path}", "--name", "piped"),
        ("infer", "Once", "--model", "{path}", "-n", "2"),
        ("infer", "Once", "--model", "{path}", "-n", "2", "--local"),
    ],
)
def test_a_fifo_is_refused_not_waited_on(fifo: Path, args: tuple[str, ...]) -> None:
    proc = run(*(a.format(path=fifo) for a in args))
    assert_refused(proc, fifo, "a FIFO (named pipe)")
    listed = run("models", "list", "--json")
    assert [m["name"] for m in json.loads(listed.stdout)] == ["stories260K"]  # nothing recorded


def test_devices_and_directories_are_refused_the_same_way(tmp_path: Path) -> None:
    device = tmp_path / "zero.gguf"
    device.symlink_to("/dev/zero")
    assert_refused(run("models", "register", str(device)), device, "a character device")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    assert_refused(run("infer", "x", "--model", str(folder)), folder, "a directory")
