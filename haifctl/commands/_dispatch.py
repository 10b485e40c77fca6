"""Where a command's work goes: to a local cluster when one is up, in-process otherwise.

The commands get the registry here (the registry daemon while a cluster on the same registry is
up, else the registry itself) and run inference here: through a cluster's gateway, or on a model
loaded in this process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import msgspec

from haifctl import security, wire
from haifctl.client import ClusterClient
from haifctl.config import Settings
from haifctl.daemon.state import cluster_registry, daemon_endpoint, running_state
from haifctl.errors import HaifError, InvalidInput, NotFound
from haifctl.files import private_dir
from haifctl.generation import (
    Completion,
    Generation,
    LocalGeneration,
    Timings,
    load_model,
    looks_like_path,
    model_at,
)
from haifctl.gguf_info import check_model_path
from haifctl.registry.remote import RemoteRegistry
from haifctl.registry.service import Registry, open_registry
from haifctl.runtime.base import TokenEvent
from haifctl.schema import MAX_TOKENS_HINT, InferenceRequest


def open_cli_registry(settings: Settings) -> Registry | RemoteRegistry:
    """The registry, with the shipped model registered on first use.

    While a local cluster that uses the same registry is up, go through its registry daemon.
    """
    address = cluster_registry(settings.home, settings.registry_url)
    if address:
        return RemoteRegistry(address, security.local(settings.home))
    if settings.sources.get("registry_url") == "default":
        private_dir(settings.home)  # the default registry lives in haifctl's own home
    registry = open_registry(settings.registry_url)
    registry.ensure_builtin()
    return registry


def cluster_gateway(settings: Settings) -> str | None:
    """Where `infer` should go: GATEWAY_URL / --gateway, else a local cluster that is up."""
    if settings.gateway_url:
        if not settings.gateway_url.startswith(("tcp://", "ipc://")):
            raise InvalidInput(
                "bad_gateway_url",
                f"gateway address {settings.gateway_url!r} is not a ZeroMQ address",
                "use tcp://HOST:PORT (see `haifctl status`)",
            )
        return settings.gateway_url
    data = running_state(settings.home)
    if data is None or data.get("state") != "ready":
        return None
    return daemon_endpoint(data, "gateway") or None


def resolve_model(settings: Settings, ref: str | None) -> wire.ModelInfo:
    """A registered NAME[:VERSION] or alias, or a path to a GGUF file."""
    ref = ref or settings.model
    if looks_like_path(ref):
        model = model_at(ref)
        # a registered file is that model, by its name and with its defaults, as through a
        # cluster (whose registry resolves a path); any other file runs as it is
        try:
            with open_cli_registry(settings) as registry:
                record = registry.resolve(str(Path(model.path).resolve()))
        except NotFound:
            return model
        return wire.ModelInfo(
            ref=record.ref,
            path=model.path,
            context_length=record.context_length,
            params=record.params,
        )
    with open_cli_registry(settings) as registry:
        record = registry.resolve(ref)
    if not Path(record.path).is_file():
        raise NotFound(
            "model_file_missing",
            f"the file of {record.ref} is gone: {record.path}",
            f"put it back, or re-register it: haifctl models rm {record.ref} && "
            f"haifctl models register PATH --name {record.name}",
        )
    return wire.ModelInfo(
        ref=record.ref,
        path=record.path,
        context_length=record.context_length,
        params=record.params,
    )


def cluster_model_ref(ref: str) -> str:
    """A model reference as a cluster takes it: a path made absolute (the daemons do not share
    this shell's directory; the cluster's registry finds the version registered at it)."""
    if looks_like_path(ref):
        return str(Path(ref).expanduser().resolve())
    return ref


def check_max_tokens(settings: Settings, max_tokens: int | None) -> None:
    """The gateway's cap on max_tokens, applied in-process too: one limit however `infer` runs
    (the message is the gateway's, so the two read alike)."""
    if max_tokens is not None and max_tokens > settings.max_tokens_cap:
        raise InvalidInput(
            "invalid_request",
            f"max_tokens: {max_tokens} is over the limit of {settings.max_tokens_cap}",
            MAX_TOKENS_HINT,
        )


def run_local(
    settings: Settings,
    request: InferenceRequest,
    on_text: Callable[[str], None],
    on_load: Callable[[wire.ModelInfo], AbstractContextManager[object]] | None = None,
) -> Completion:
    """Generate in-process; Ctrl-C cancels and returns what was produced.  ``on_load`` wraps
    the model's loading (a spinner on a terminal)."""
    model = resolve_model(settings, request.model)
    check_max_tokens(settings, request.max_tokens or settings.max_tokens)
    started = time.perf_counter()
    with on_load(model) if on_load is not None else nullcontext():
        loaded = load_model(settings, model, slots=settings.slots or 1)  # one request: one slot
    try:
        load_ms = (time.perf_counter() - started) * 1000
        generation = LocalGeneration(model, loaded, request, settings.max_tokens, load_ms)
        try:
            for event in generation:
                on_text(event.text)
        except KeyboardInterrupt:
            generation.cancel()
        return generation.completion()
    finally:
        loaded.close()


def run_cluster(
    address: str, settings: Settings, request: InferenceRequest, on_text: Callable[[str], None]
) -> Completion:
    """Generate through a cluster's gateway; Ctrl-C cancels the generation on the worker."""
    body = msgspec.to_builtins(request)
    assert isinstance(body, dict)
    if request.model is None and settings.sources.get("model") != "default":
        body["model"] = settings.model
    if body.get("model"):
        ref = str(body["model"])
        if looks_like_path(ref) and not settings.gateway_url:
            check_model_path(Path(ref))  # this machine's cluster: a missing file, said as locally
        body["model"] = cluster_model_ref(ref)
    if request.max_tokens is None:
        body["max_tokens"] = settings.max_tokens
    generation = Generation(str(body.get("model") or settings.model))
    final: wire.Done | None = None
    with ClusterClient(address, security.local(settings.home)) as client:
        client.ping(timeout=2.0)  # fail fast when nothing answers there
        stream = client.stream(body)
        try:
            for msg in stream:
                if isinstance(msg, wire.Chunk):
                    generation.record(TokenEvent(text=msg.text, n_tokens=msg.n_tokens))
                    on_text(msg.text)
                elif isinstance(msg, wire.Error):
                    error = HaifError.from_wire(msg)
                    if error.retry_after is not None:
                        error.hint = (error.hint + "; " if error.hint else "") + (
                            f"retry after {error.retry_after:g}s"
                        )
                    raise error
                elif isinstance(msg, wire.Done):  # a generation ends with Done, nothing else
                    final = msg
                    generation.model = msg.model
                    generation.record(
                        TokenEvent(
                            text="",
                            finish_reason=msg.finish_reason,
                            prompt_tokens=msg.prompt_tokens,
                            completion_tokens=msg.completion_tokens,
                        )
                    )
        except KeyboardInterrupt:
            stream.close()  # sends the cancel to the worker
    generation.stop()
    completion = generation.completion(served_by="cluster", worker=final.worker if final else None)
    if final is None:
        return completion
    # The worker's clock, not this one: frames carry several tokens each, so timing their
    # arrival here would count a frame's tokens as if they came at once.
    return msgspec.structs.replace(completion, timings=worker_timings(final))


def worker_timings(done: wire.Done) -> Timings:
    """Timings as the worker measured them: the decode rate over the tokens after the first,
    as :class:`haifctl.generation.Generation` computes it in-process."""
    ttft = done.time_to_first_token_ms
    decode_ms = done.generation_ms - (ttft or 0.0)
    tokens = done.completion_tokens
    rate = round((tokens - 1) / (decode_ms / 1000), 1) if tokens > 1 and decode_ms > 0 else 0.0
    return Timings(
        load_ms=0.0,
        time_to_first_token_ms=ttft,
        generation_ms=round(done.generation_ms, 3),
        tokens_per_second=rate,
    )
