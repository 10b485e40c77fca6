"""Private folders and logs, and model paths that must be regular files."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from haifctl.commands._dispatch import open_cli_registry
from haifctl.config import resolve
from haifctl.errors import InvalidInput
from haifctl.files import open_log, private_dir
from haifctl.gguf_info import check_model_path, read_facts
from haifctl.hashing import sha256_file
from haifctl.keys import KeyStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_creates_folders_0700_and_leaves_existing_ones(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        made = private_dir(tmp_path / "a" / "b" / "c")
        assert made.is_dir()
        for folder in (tmp_path / "a", tmp_path / "a" / "b", made):
            assert mode(folder) == 0o700, folder
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        shared.chmod(0o755)
        private_dir(shared / "inner")
        assert mode(shared) == 0o755  # not ours to change
        assert mode(shared / "inner") == 0o700
    finally:
        os.umask(old)


def test_log_files_are_0600_even_one_left_0644(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "logs" / "x.log"
        fd = open_log(path)
        os.write(fd, b"one\n")
        os.close(fd)
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
        path.chmod(0o644)
        fd = open_log(path)
        os.write(fd, b"two\n")
        os.close(fd)
        assert mode(path) == 0o600
        assert path.read_text() == "one\ntwo\n"  # appended, not truncated
    finally:
        os.umask(old)


def test_a_home_that_haifctl_creates_is_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        home = tmp_path / "fresh" / "home"
        # the default registry's home is created on first use (a registry URL elsewhere must
        # name a directory that exists: tests/e2e/test_models_cli.py)
        open_cli_registry(resolve({"home": home}, env={})).close()
        assert mode(home) == 0o700
        keys_home = tmp_path / "keys-home"
        KeyStore(keys_home).create("ci")
        assert mode(keys_home) == 0o700
        assert mode(keys_home / "keys.json") == 0o600
    finally:
        os.umask(old)


def refuses_at_once(fn: Callable[[], object], fifo: Path) -> InvalidInput:
    """Run ``fn``; it must raise InvalidInput, not block on the FIFO.  If it blocks, a writer
    opens the FIFO to release it, and the test fails."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go
        thread.join(timeout=20)
        pytest.fail(f"{fn} blocked on the FIFO")
    error = outcome[0]
    assert isinstance(error, InvalidInput), error
    return error


@pytest.mark.parametrize("reader", [check_model_path, read_facts, sha256_file])
def test_model_readers_refuse_a_fifo_without_blocking(
    tmp_path: Path, reader: Callable[[Path], object]
) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    error = refuses_at_once(lambda: reader(fifo), fifo)
    assert error.code == "not_a_file"
    assert error.message == f"{fifo} is a FIFO (named pipe), not a regular file"
    assert error.hint


def test_model_readers_refuse_directories_and_devices(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is a directory, not a regular file"):
        check_model_path(tmp_path)
    with pytest.raises(InvalidInput, match="is a character device, not a regular file"):
        sha256_file(Path("/dev/zero"))  # would never end
    link = tmp_path / "link.gguf"
    link.symlink_to("/dev/null")
    with pytest.raises(InvalidInput, match="is a character device"):
        check_model_path(link)
