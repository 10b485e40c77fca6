"""`haifctl infer` behaves the same in-process and through a cluster: a model given as a path,
the limits, the exit codes, the model's name, and timings measured where the tokens are made."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Run


@pytest.fixture
def cluster(haifctl: Run) -> Iterator[None]:
    up = haifctl("up", "--bridge-bind", "127.0.0.1:0")
    assert up.returncode == 0, up.stderr
    try:
        yield
    finally:
        haifctl("down")


def both(haifctl: Run, *args: str) -> tuple[object, object]:
    """The same command through the cluster and with --local."""
    return haifctl(*args), haifctl(*args, "--local")


def metric(text: str, name: str) -> float:
    """The sum of one metric's samples in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_model_path_works_through_the_cluster_as_in_process(
    haifctl: Run, cluster: None, model_path: Path, tmp_path: Path
) -> None:
    args = ("infer", "Once upon a time", "-n", "12", "--seed", "3", "-o", "json")
    clustered, local = both(haifctl, *args, "--model", str(model_path))
    assert clustered.returncode == 0, clustered.stderr
    assert local.returncode == 0, local.stderr
    served, here = json.loads(clustered.stdout), json.loads(local.stdout)
    assert served["served_by"] == "cluster"
    assert here["served_by"] == "in-process"
    # one name for the model, the registered one, and the same text (same seed)
    assert served["model"] == here["model"] == "stories260K:1"
    assert served["text"] == here["text"]

    # a file no one registered: the cluster cannot serve it and says what to do
    other = tmp_path / "copy.gguf"
    shutil.copyfile(model_path, other)
    refused = haifctl("infer", "Once", "-n", "4", "--model", str(other))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: no registered model has the file {other}")
    assert "haifctl models register" in refused.stderr
    assert "--local" in refused.stderr
    assert haifctl("infer", "Once", "-n", "4", "--model", str(other), "--local").returncode == 0


def test_limits_exit_codes_and_errors_are_the_same(haifctl: Run, cluster: None) -> None:
    clustered, local = both(haifctl, "infer", "Once", "--max-tokens", "100000")
    assert clustered.returncode == local.returncode == 2
    first = clustered.stderr.splitlines()[0]
    assert first == "error: max_tokens: 100000 is over the limit of 4096"
    assert local.stderr == clustered.stderr
    assert "hint: " in local.stderr

    # within the cap, both stop where the model's context ends
    clustered, local = both(
        haifctl, "infer", "Once", "--max-tokens", "3000", "--ignore-eos", "-o", "json"
    )
    for proc in (clustered, local):
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["finish_reason"] == "length"
        assert out["usage"]["total_tokens"] == 2048  # the model's trained context

    clustered, local = both(haifctl, "infer", "Once", "--model", "ghost")
    assert clustered.returncode == local.returncode == 2
    assert clustered.stderr == local.stderr
    assert clustered.stderr.startswith("error: unknown model 'ghost'")

    clustered, local = both(haifctl, "infer", "Once", "--model", "/no/such/model.gguf")
    assert clustered.returncode == local.returncode == 2
    assert clustered.stderr == local.stderr
    assert clustered.stderr.startswith("error: no such file: /no/such/model.gguf")

    clustered, local = both(haifctl, "infer", "Once", "--model", "ghost", "-o", "json")
    assert json.loads(clustered.stdout) == json.loads(local.stdout)
    assert json.loads(local.stdout)["error"]["code"] == "model_not_found"


def test_cluster_timings_are_the_workers(haifctl: Run, cluster: None) -> None:
    proc = haifctl("infer", "Once upon a time", "-n", "64", "--ignore-eos", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["usage"]["completion_tokens"] == 64
    timings = out["timings"]
    status = json.loads(haifctl("status", "--json").stdout)
    url = next(d["metrics"] for d in status["daemons"] if d["name"] == "worker-1")
    with urllib.request.urlopen(url, timeout=10) as resp:
        metrics = resp.read().decode()
    # the worker's own record of this, its only request: the time per output token after the
    # first, and the generation's duration
    per_token_s = metric(metrics, "haif_time_per_output_token_seconds_sum")
    assert metric(metrics, "haif_time_per_output_token_seconds_count") == 1
    assert timings["tokens_per_second"] == pytest.approx(1 / per_token_s, rel=0.01)
    ttft_s = metric(metrics, "haif_time_to_first_token_seconds_sum")
    assert timings["time_to_first_token_ms"] == pytest.approx(ttft_s * 1000, rel=0.01)


def test_streamed_and_whole_replies_name_the_model_alike(haifctl: Run, cluster: None) -> None:
    from openai import OpenAI

    status = json.loads(haifctl("status", "--json").stdout)
    bridge = next(d["endpoint"] for d in status["daemons"] if d["name"] == "bridge")
    client = OpenAI(base_url=bridge + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "A story"}]
    for model in ("stories260K", "stories260K:1"):
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
        chunks = list(
            client.chat.completions.create(
                model=model, messages=messages, max_tokens=4, stream=True
            )
        )
        assert whole.model == model
        assert {c.model for c in chunks} == {model}
        text = client.completions.create(model=model, prompt="Once", max_tokens=4)
        streamed = list(
            client.completions.create(model=model, prompt="Once", max_tokens=4, stream=True)
        )
        assert text.model == model
        assert {c.model for c in streamed} == {model}
