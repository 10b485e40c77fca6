"""How `haifctl up` divides the cores among its workers' llama.cpp threads."""

from __future__ import annotations

from pathlib import Path

import pytest

from haifctl.daemon.supervisor import Supervisor, prompt_share_of_cores, share_of_cores


@pytest.mark.parametrize(
    ("cores", "workers", "generate", "prompts"),
    [
        (1, 1, 1, 1),
        (2, 1, 1, 2),  # one core left to the relays while tokens stream; both for a prompt
        (2, 2, 1, 1),
        (4, 1, 3, 4),
        (8, 2, 3, 4),
        (16, 3, 5, 5),
        (64, 1, 8, 64),  # generation is bound by memory bandwidth past 8; prompts are not
    ],
)
def test_shares_of_the_cores(cores: int, workers: int, generate: int, prompts: int) -> None:
    assert share_of_cores(cores, workers) == generate
    assert prompt_share_of_cores(cores, workers) == prompts


def supervisor(tmp_path: Path, threads: int = 0, threads_batch: int = 0) -> Supervisor:
    return Supervisor(
        tmp_path,
        workers=1,
        models=["stories260K:1"],
        registry_url="sqlite:///unused.db",
        worker_threads=threads,
        worker_threads_batch=threads_batch,
    )


def test_workers_get_the_shares_unless_the_user_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert supervisor(tmp_path).threads_for(1) == (1, 2)
    assert supervisor(tmp_path).threads_for(2) == (1, 0)  # 0: as many as for generation
    # --threads alone: prompts as many, as llama.cpp would
    assert supervisor(tmp_path, threads=2).threads_for(1) == (2, 0)
    assert supervisor(tmp_path, threads_batch=1).threads_for(1) == (1, 1)
    assert supervisor(tmp_path, threads=1, threads_batch=2).threads_for(2) == (1, 2)
    worker = supervisor(tmp_path).new_worker("stories260K:1", (1, 2), 1)
    assert worker.args[-4:] == ["--threads-batch", "2", "--memory", "100%"]
