"""`haifctl embed`: embedding vectors of texts."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import msgspec
import typer

from haifctl import security, wire
from haifctl.client import ClusterClient
from haifctl.commands._dispatch import cluster_gateway, cluster_model_ref, resolve_model
from haifctl.commands._shared import (
    GatewayOpt,
    GpuLayersOpt,
    JsonFlag,
    LocalFlag,
    ModelOpt,
    NCtxOpt,
    ThreadsOpt,
    print_json,
    state,
    want_json,
)
from haifctl.config import Settings
from haifctl.errors import HaifError, InvalidInput
from haifctl.generation import load_model
from haifctl.schema import EmbedRequest, validate_any

MAX_STDIN_CHARS = 16 * 1024 * 1024


class Embedded(msgspec.Struct, frozen=True, kw_only=True):
    """What ``--json`` prints: one vector per text, in order, and the tokens read."""

    model: str
    vectors: list[list[float]]
    prompt_tokens: int
    served_by: str
    worker: str | None = None
    load_ms: float = 0.0


def embed_local(settings: Settings, request: EmbedRequest) -> Embedded:
    """Load the model with embeddings in this process and embed."""
    model = resolve_model(settings, request.model)
    started = time.perf_counter()
    loaded = load_model(settings, model, slots=1, embeddings=True)
    try:
        load_ms = round((time.perf_counter() - started) * 1000, 3)
        vectors, n_tokens = loaded.embed(list(request.input))
    finally:
        loaded.close()
    return Embedded(
        model=model.ref,
        # as a worker sends them (float32), so that the output is the same either way
        vectors=[wire.float32_list(wire.float32_bytes(v)) for v in vectors],
        prompt_tokens=n_tokens,
        served_by="in-process",
        load_ms=load_ms,
    )


def embed_cluster(address: str, settings: Settings, request: EmbedRequest) -> Embedded:
    """Embed on a worker of the cluster that serves the model with embeddings."""
    body: dict[str, Any] = {"op": "embed", "input": list(request.input)}
    model = request.model
    if model is None and settings.sources.get("model") != "default":
        model = settings.model
    if model:
        body["model"] = cluster_model_ref(model)
    with ClusterClient(address, security.local(settings.home)) as client:
        client.ping(timeout=2.0)  # fail fast when nothing answers there
        answer = client.ask(body)
    if isinstance(answer, wire.Error):
        raise HaifError.from_wire(answer)
    if not isinstance(answer, wire.Embeddings):
        raise HaifError("protocol_error", f"unexpected answer {type(answer).__name__}")
    return Embedded(
        model=answer.model,
        vectors=[wire.float32_list(v) for v in answer.vectors],
        prompt_tokens=answer.prompt_tokens,
        served_by="cluster",
        worker=answer.worker,
    )


def embed(
    ctx: typer.Context,
    texts: Annotated[
        list[str] | None,
        typer.Argument(help="Texts to embed, one vector each; '-' reads one from stdin."),
    ] = None,
    model: ModelOpt = None,
    as_json: JsonFlag = False,
    n_ctx: NCtxOpt = None,
    n_gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    local: LocalFlag = False,
    gateway: GatewayOpt = None,
) -> None:
    """Print the embedding of each TEXT: one JSON array of numbers per line, L2-normalised.

    Goes through the cluster when one is up (to a worker started with --embeddings), and runs
    in-process otherwise; --local forces in-process.

    Examples:

      haifctl embed "Once upon a time"

      haifctl embed "a cat" "a dog" --json
    """
    want_json(ctx, as_json)
    settings = state(ctx).settings(
        model=model, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads, gateway_url=gateway
    )
    if not texts:
        raise InvalidInput(
            "missing_input", "no text given", 'haifctl embed "Once upon a time", or - for stdin'
        )
    inputs = [sys.stdin.read(MAX_STDIN_CHARS) if text == "-" else text for text in texts]
    fields: dict[str, Any] = {"op": "embed", "input": inputs}
    if model is not None:
        fields["model"] = model
    request = validate_any(fields, "embed")
    assert isinstance(request, EmbedRequest)
    address = None if local else cluster_gateway(settings)
    if address is not None:
        result = embed_cluster(address, settings, request)
    else:
        result = embed_local(settings, request)
    if as_json:
        print_json(msgspec.to_builtins(result))
        return
    out = sys.stdout
    for vector in result.vectors:
        out.write(json.dumps(vector) + "\n")
    out.flush()
