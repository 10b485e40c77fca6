"""In-process inference: from a request to a stream of tokens, with no daemon involved."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from haifctl.chat import build_prompt
from haifctl.config import Settings
from haifctl.errors import HaifError, NotFound
from haifctl.gguf_info import check_model_path, read_facts
from haifctl.registry.service import Registry, open_registry

if TYPE_CHECKING:
    from haifctl.registry.remote import RemoteRegistry
from haifctl.runtime.base import CancelToken, LoadedModel, LoadOptions, TokenEvent
from haifctl.schema import InferenceRequest


class ResolvedModel(msgspec.Struct, frozen=True, kw_only=True):
    ref: str
    path: str
    context_length: int | None
    params: dict[str, Any]


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    load_ms: float
    time_to_first_token_ms: float | None
    generation_ms: float
    tokens_per_second: float


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one request, as ``--output json`` prints it."""

    model: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    served_by: str = "in-process"
    worker: str | None = None


def open_cli_registry(settings: Settings) -> Registry | RemoteRegistry:
    """The registry, with the shipped model registered on first use.

    While a local cluster that uses the same registry is up, go through its registry daemon.
    """
    from haifctl.daemon.state import cluster_registry

    address = cluster_registry(settings.home, settings.registry_url)
    if address:
        from haifctl.registry.remote import RemoteRegistry

        return RemoteRegistry(address)
    registry = open_registry(settings.registry_url)
    registry.ensure_builtin()
    return registry


def looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or "/" in ref or ref.startswith(("~", "."))


def resolve_model(settings: Settings, ref: str | None) -> ResolvedModel:
    """A registered NAME[:VERSION] or alias, or a path to a GGUF file."""
    ref = ref or settings.model
    if looks_like_path(ref):
        path = check_model_path(Path(ref))
        facts = read_facts(path)
        return ResolvedModel(
            ref=str(path), path=str(path), context_length=facts.context_length, params={}
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
    return ResolvedModel(
        ref=record.ref,
        path=record.path,
        context_length=record.context_length,
        params=record.params,
    )


def load_model(settings: Settings, model: ResolvedModel) -> LoadedModel:
    from haifctl.runtime.llamacpp import LlamaCppRuntime

    options = LoadOptions(
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        threads=settings.threads,
        n_ctx_train=model.context_length,
        slots=max(1, settings.slots),
    )
    return LlamaCppRuntime().load(Path(model.path), options)


def render_prompt(request: InferenceRequest, loaded: LoadedModel) -> str:
    messages = request.chat_messages()
    if messages is None:
        return request.prompt or ""
    return build_prompt(
        messages,
        loaded.info.chat_template,
        bos_token=loaded.info.bos_token,
        eos_token=loaded.info.eos_token,
    )


class Generation:
    """A running completion: iterate for token events, then read :attr:`result`."""

    def __init__(
        self,
        model_ref: str,
        loaded: LoadedModel,
        request: InferenceRequest,
        defaults: dict[str, Any],
        max_tokens: int,
        load_ms: float,
    ) -> None:
        self.model_ref = model_ref
        self.cancel_token = CancelToken()
        self._load_ms = load_ms
        self._params = request.sampling(defaults, max_tokens)
        prompt = render_prompt(request, loaded)
        self._prompt_tokens = loaded.count_tokens(prompt)
        self._started = time.perf_counter()
        self._events = loaded.generate(prompt, self._params, self.cancel_token)
        self._first: float | None = None
        self._text: list[str] = []
        self._n_tokens = 0
        self.result: Completion | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for event in self._events:
                if self._first is None and event.n_tokens:
                    self._first = time.perf_counter()
                self._text.append(event.text)
                self._n_tokens += event.n_tokens
                if event.finish_reason is not None:
                    self._finish(event)
                yield event
        finally:
            self.close()

    def _finish(self, event: TokenEvent) -> None:
        elapsed = time.perf_counter() - self._started
        decode_time = elapsed - ((self._first or self._started) - self._started)
        # Tokens/s over the decode phase (after the first token), as llama.cpp reports it.
        tps = (event.completion_tokens - 1) / decode_time if event.completion_tokens > 1 else 0.0
        self.result = Completion(
            model=self.model_ref,
            text="".join(self._text),
            finish_reason=event.finish_reason or "stop",
            usage=Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                total_tokens=event.prompt_tokens + event.completion_tokens,
            ),
            timings=Timings(
                load_ms=round(self._load_ms, 3),
                time_to_first_token_ms=(
                    round((self._first - self._started) * 1000, 3) if self._first else None
                ),
                generation_ms=round(elapsed * 1000, 3),
                tokens_per_second=round(tps, 1),
            ),
        )

    def cancel(self) -> Completion:
        """Stop generating and return what was produced, marked ``cancelled``."""
        self.cancel_token.cancel()
        if self.result is None:
            # The runtime's stream may already be dead (an interrupt raised inside it): then
            # there is no closing event to drain, and the counts come from what was seen.
            for _ in self:
                pass
        if self.result is None:
            self._finish(
                TokenEvent(
                    text="",
                    finish_reason="cancelled",
                    prompt_tokens=self._prompt_tokens,
                    completion_tokens=self._n_tokens,
                )
            )
        assert self.result is not None
        return self.result

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


def start_generation(
    settings: Settings, request: InferenceRequest
) -> tuple[Generation, LoadedModel]:
    """Resolve the model, load it, and begin generating.  The caller closes the model."""
    model = resolve_model(settings, request.model)
    started = time.perf_counter()
    loaded = load_model(settings, model)
    load_ms = (time.perf_counter() - started) * 1000
    try:
        generation = Generation(
            model.ref, loaded, request, model.params, settings.max_tokens, load_ms
        )
    except BaseException:
        loaded.close()
        raise
    return generation, loaded


def run_local(
    settings: Settings, request: InferenceRequest, on_text: Callable[[str], None]
) -> Completion:
    """Generate in-process; Ctrl-C cancels and returns what was produced."""
    generation, loaded = start_generation(settings, request)
    try:
        try:
            for event in generation:
                on_text(event.text)
            result = generation.result
        except KeyboardInterrupt:
            result = generation.cancel()
        assert result is not None
        return result
    finally:
        loaded.close()


def run_cluster(
    address: str, settings: Settings, request: InferenceRequest, on_text: Callable[[str], None]
) -> Completion:
    """Generate through a cluster's gateway; Ctrl-C cancels the generation on the worker."""
    from haifctl import wire
    from haifctl.client import ClusterClient

    body = msgspec.to_builtins(request)
    assert isinstance(body, dict)
    if request.model is None and settings.sources.get("model") != "default":
        body["model"] = settings.model
    if request.max_tokens is None:
        body["max_tokens"] = settings.max_tokens
    text: list[str] = []
    n_tokens = 0
    first: float | None = None
    started = time.perf_counter()
    final: wire.Done | None = None
    with ClusterClient(address) as client:
        client.ping(timeout=2.0)  # fail fast when nothing answers there
        stream = client.stream(body)
        try:
            for msg in stream:
                if isinstance(msg, wire.Chunk):
                    if first is None:
                        first = time.perf_counter()
                    n_tokens += msg.n_tokens
                    text.append(msg.text)
                    on_text(msg.text)
                elif isinstance(msg, wire.Error):
                    error = HaifError.from_wire(msg)
                    if error.retry_after is not None:
                        error.hint = (error.hint + "; " if error.hint else "") + (
                            f"retry after {error.retry_after:g}s"
                        )
                    raise error
                else:
                    final = msg
        except KeyboardInterrupt:
            stream.close()  # sends the cancel to the worker
    elapsed = time.perf_counter() - started
    completion_tokens = final.completion_tokens if final else n_tokens
    decode = elapsed - ((first or started) - started)
    return Completion(
        model=final.model if final else str(body.get("model") or settings.model),
        text="".join(text),
        finish_reason=final.finish_reason if final else "cancelled",
        usage=Usage(
            prompt_tokens=final.prompt_tokens if final else 0,
            completion_tokens=completion_tokens,
            total_tokens=(final.prompt_tokens if final else 0) + completion_tokens,
        ),
        timings=Timings(
            load_ms=0.0,
            time_to_first_token_ms=round((first - started) * 1000, 3) if first else None,
            generation_ms=round(elapsed * 1000, 3),
            tokens_per_second=round((completion_tokens - 1) / decode, 1)
            if completion_tokens > 1 and decode > 0
            else 0.0,
        ),
        served_by="cluster",
        worker=final.worker if final else None,
    )
