"""Embeddings and the token routes against a live cluster: /v1/embeddings driven by the official
SDK, /tokenize and /detokenize by httpx, and `haifctl embed` in a subprocess, in-process and
through the cluster.  The cluster has one worker without embeddings; a second one, started with
--embeddings, is what embedding requests must go to."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.cluster import HAIFCTL, Cluster

KEY = "haif-test-key-embeddings"
MODEL = "stories260K"
TEXT = "Once upon a time"
OTHER = "The little fox ran far away."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("embeddings"),
        workers=1,
        slots=2,
        bridge_env={"HAIF_API_KEYS": KEY},
    )
    try:
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), codes


def embedder_running(cluster: Cluster) -> bool:
    proc = cluster.procs.get("embedder")
    return proc is not None and proc.popen.poll() is None


@pytest.fixture
def embedder(cluster: Cluster) -> Cluster:
    """The cluster with a worker that serves the model with embeddings, besides the plain one."""
    if not embedder_running(cluster):
        proc = cluster.start(
            "embedder",
            [
                "worker",
                "--orchestrator",
                cluster.orchestrator,
                "--worker-id",
                "embedder",
                "--heartbeat",
                "0.2",
                "--embeddings",
            ],
        )
        proc.wait_ready()
        cluster.wait_workers(2, ids={"worker-1", "embedder"})
    return cluster


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.bridge}/v1", api_key=KEY, max_retries=0)


def post(cluster: Cluster, path: str, body: dict[str, Any], key: str | None = KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{cluster.bridge}{path}", json=body, headers=headers, timeout=30)


def vector(client: openai.OpenAI, text: str) -> np.ndarray:
    answer = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    return np.array(answer.data[0].embedding)


def test_a_model_served_without_embeddings_is_a_400_naming_it(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    if embedder_running(cluster):  # another test started it: back to the plain worker alone
        cluster.procs["embedder"].stop()
        cluster.wait_workers(1, ids={"worker-1"})
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=TEXT)
    assert info.value.status_code == 400
    body: Any = info.value.body
    assert body["code"] == "embeddings_unsupported"
    assert "stories260K:1" in body["message"]
    assert "--embeddings" in body["message"]


def test_equal_texts_equal_vectors_different_texts_differ(
    embedder: Cluster, client: openai.OpenAI
) -> None:
    first, again, other = vector(client, TEXT), vector(client, TEXT), vector(client, OTHER)
    assert first.shape == (64,)  # the shipped model's embedding size
    assert np.array_equal(first, again)
    assert not np.allclose(first, other, atol=1e-3)
    for v in (first, other):
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)  # L2-normalised, as OpenAI's


def test_a_list_gives_one_vector_per_input_in_order_and_usage_counts_tokens(
    embedder: Cluster, client: openai.OpenAI
) -> None:
    texts = [OTHER, TEXT, "A cat sat on the mat."]
    answer = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in answer.data] == [0, 1, 2]
    for text, item in zip(texts, answer.data, strict=True):
        assert np.array_equal(np.array(item.embedding), vector(client, text))
    # what the worker read: each text's tokens with the beginning-of-text token in front
    counts = [
        len(post(embedder, "/tokenize", {"content": t, "add_special": True}).json()["tokens"])
        for t in texts
    ]
    assert answer.usage.prompt_tokens == sum(counts)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens
    assert answer.model == MODEL


def test_base64_decodes_to_the_same_floats(embedder: Cluster, client: openai.OpenAI) -> None:
    floats = vector(client, TEXT)
    # the SDK asks for base64 when no encoding_format is given, and decodes it itself
    sdk = client.embeddings.create(model=MODEL, input=TEXT)
    assert np.array_equal(np.array(sdk.data[0].embedding), floats)
    raw = post(embedder, "/v1/embeddings", {"input": TEXT, "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    encoded = raw.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert np.array_equal(decoded.astype(np.float64), floats)


def test_token_id_inputs_embed_as_their_text(embedder: Cluster, client: openai.OpenAI) -> None:
    ids = post(embedder, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"]
    one = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert np.array_equal(np.array(one.data[0].embedding), vector(client, TEXT))
    several = client.embeddings.create(model=MODEL, input=[ids, ids[:3]], encoding_format="float")
    assert len(several.data) == 2
    assert several.usage.prompt_tokens == len(ids) + 3
    bad = post(embedder, "/v1/embeddings", {"input": [[1, 10**6]]})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_token"


def test_dimensions_other_than_the_models_are_refused_by_name(
    embedder: Cluster, client: openai.OpenAI
) -> None:
    same = client.embeddings.create(model=MODEL, input=TEXT, dimensions=64)
    assert len(same.data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=TEXT, dimensions=32)
    body: Any = info.value.body
    assert body["param"] == "dimensions"
    assert "64" in body["message"]


def test_embedding_mistakes_are_clear(embedder: Cluster, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input=TEXT)
    empty = post(embedder, "/v1/embeddings", {"input": []})
    assert empty.status_code == 400
    assert empty.json()["error"]["param"] == "input"
    unknown = post(embedder, "/v1/embeddings", {"input": TEXT, "truncate": True})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "truncate"
    assert post(embedder, "/v1/embeddings", {"input": TEXT}, key=None).status_code == 401


# tokenize and detokenize --------------------------------------------------------------------


def test_tokenize_then_detokenize_round_trips(cluster: Cluster) -> None:
    for text in (TEXT, "Hello, world! Ünïcödé and 日本語 too.", ""):
        tokens = post(cluster, "/tokenize", {"content": text})
        assert tokens.status_code == 200, tokens.text
        ids = tokens.json()["tokens"]
        assert all(isinstance(i, int) for i in ids)
        back = post(cluster, "/detokenize", {"tokens": ids, "model": MODEL})
        assert back.status_code == 200, back.text
        assert back.json() == {"content": text}


def test_tokenize_options(cluster: Cluster) -> None:
    plain = post(cluster, "/tokenize", {"content": TEXT}).json()["tokens"]
    special = post(cluster, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"]
    assert special[1:] == plain
    assert len(special) == len(plain) + 1
    pieces = post(cluster, "/tokenize", {"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain
    assert "".join(p["piece"] for p in pieces).strip() == TEXT


def test_token_route_mistakes(cluster: Cluster) -> None:
    unknown = post(cluster, "/detokenize", {"tokens": [1, 2, 10**6]})
    assert unknown.status_code == 400
    error = unknown.json()["error"]
    assert error["code"] == "invalid_token"
    assert str(10**6) in error["message"]
    assert post(cluster, "/detokenize", {"tokens": [-1]}).status_code == 400
    missing = post(cluster, "/tokenize", {"content": TEXT, "model": "no-such-model"})
    assert missing.status_code == 404
    assert post(cluster, "/tokenize", {"content": TEXT}, key=None).status_code == 401
    assert post(cluster, "/detokenize", {"tokens": [1]}, key="wrong").status_code == 401
    extra = post(cluster, "/tokenize", {"content": TEXT, "n_probs": 3})
    assert extra.status_code == 400
    assert extra.json()["error"]["param"] == "n_probs"


# the CLI ------------------------------------------------------------------------------------


def run_embed(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAIFCTL, "embed", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_haifctl_embed_through_the_cluster_and_in_process(
    embedder: Cluster, client: openai.OpenAI, tmp_path: Any
) -> None:
    via_cluster = run_embed(
        {**embedder.env, "HAIF_GATEWAY_URL": embedder.gateway}, TEXT, OTHER, "--json"
    )
    assert via_cluster.returncode == 0, via_cluster.stderr
    result = json.loads(via_cluster.stdout)
    assert result["served_by"] == "cluster"
    assert result["worker"] == "embedder"
    assert len(result["vectors"]) == 2
    assert np.array_equal(np.array(result["vectors"][0]), vector(client, TEXT))

    alone = {k: v for k, v in os.environ.items() if not k.startswith("HAIF_")}
    alone["HAIF_HOME"] = str(tmp_path / "home")
    local = run_embed(alone, TEXT, "--json")
    assert local.returncode == 0, local.stderr
    in_process = json.loads(local.stdout)
    assert in_process["served_by"] == "in-process"
    assert in_process["model"] == "stories260K:1"
    np.testing.assert_allclose(in_process["vectors"][0], result["vectors"][0], atol=1e-5)
    assert in_process["prompt_tokens"] == len(
        post(embedder, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"]
    )

    lines = run_embed(alone, TEXT, OTHER)
    assert lines.returncode == 0, lines.stderr
    printed = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(printed) == 2
    assert all(len(v) == 64 for v in printed)

    nothing = run_embed(alone)
    assert nothing.returncode == 2
    assert "error: no text given" in nothing.stderr
