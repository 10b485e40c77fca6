"""Models on demand as a user drives them: `haifctl models load/unload`, `haifctl ps`, and the
per-model rows of `haifctl top`, on a cluster started with `haifctl up`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl.registry.service import builtin_model_path
from tests.e2e.conftest import Run


@pytest.fixture
def cluster(haifctl: Run) -> Iterator[None]:
    up = haifctl("up", "--workers", "1", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr
    try:
        yield
    finally:
        haifctl("down")


def ps(haifctl: Run) -> dict[str, dict[str, object]]:
    proc = haifctl("ps", "--json")
    assert proc.returncode == 0, proc.stderr
    return {row["model"]: row for row in json.loads(proc.stdout)}


def test_load_ps_top_infer_and_unload(haifctl: Run, cluster: None, tmp_path: Path) -> None:
    copy = shutil.copy(builtin_model_path(), tmp_path / "other.gguf")
    assert haifctl("models", "register", str(copy), "--name", "other").returncode == 0
    assert set(ps(haifctl)) == {"stories260K:1"}
    loaded = haifctl("models", "load", "other", "--worker", "worker-1")
    assert loaded.returncode == 0, loaded.stderr
    assert "other:1: loaded on worker-1" in loaded.stdout
    rows = ps(haifctl)
    assert set(rows) == {"stories260K:1", "other:1"}
    row = rows["other:1"]
    assert row["worker"] == "worker-1"
    assert row["state"] == "loaded"
    assert row["busy"] == 0
    assert row["served"] == 0
    left = row["keep_alive_left_s"]
    assert isinstance(left, float)
    assert 240 < left <= 300  # loaded by hand: the worker's five minutes, running
    table = haifctl("ps").stdout
    assert "other:1" in table
    assert "100% CPU" in table
    assert "forever" in table  # the model the worker started with stays
    again = haifctl("models", "load", "other", "--json")
    assert json.loads(again.stdout)["message"] == "already loaded"
    infer = haifctl("infer", "Once upon a time", "-m", "other", "-n", "5", "--seed", "1")
    assert infer.returncode == 0, infer.stderr
    assert ps(haifctl)["other:1"]["served"] == 1
    top = json.loads(haifctl("top", "--json").stdout)
    models = {m["ref"] for w in top["workers"] for m in w["loaded"]}
    assert models == {"stories260K:1", "other:1"}
    orchestrator = next(d for d in top["daemons"] if d["name"] == "orchestrator")
    assert orchestrator["cpu_s"] > 0
    assert orchestrator["rss_bytes"] > 10 * 1024 * 1024
    text = haifctl("top", "--once").stdout
    assert "KEEP-ALIVE" in text
    assert "other:1" in text
    assert "MEMORY" in text
    assert "MiB" in text
    unloaded = haifctl("models", "unload", "other")
    assert unloaded.returncode == 0, unloaded.stderr
    assert "other:1: unloaded from worker-1" in unloaded.stdout
    assert set(ps(haifctl)) == {"stories260K:1"}
    missing = haifctl("models", "unload", "other")
    assert missing.returncode != 0
    assert "other:1 is not loaded" in missing.stderr
    nowhere = haifctl("models", "load", "other", "--worker", "worker-9")
    assert nowhere.returncode != 0
    assert "no worker 'worker-9'" in nowhere.stderr
