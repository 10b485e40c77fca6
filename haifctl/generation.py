"""Generation: from a request and a model to a stream of tokens, counted and timed.

What runs a model needs this, a worker as much as ``haifctl infer`` in-process: a model given as
a path, loading it, rendering the prompt, and :class:`Generation`, which owns a completion's text,
counts and timings.  Where a model or a request comes from (the registry, a cluster) is the
caller's business.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from haifctl import wire
from haifctl.chat import build_prompt
from haifctl.config import Settings
from haifctl.gguf_info import check_model_path, read_facts
from haifctl.runtime.base import CancelToken, LoadOptions, TokenEvent
from haifctl.runtime.engine import LoadedModel, Sink
from haifctl.schema import InferenceRequest


def looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or "/" in ref or ref.startswith(("~", "."))


def model_at(path: str) -> wire.ModelInfo:
    """A model given as a path to a GGUF file, known by that path."""
    checked = check_model_path(Path(path))
    facts = read_facts(checked)
    return wire.ModelInfo(
        ref=str(checked), path=str(checked), context_length=facts.context_length, params={}
    )


def load_model(
    settings: Settings,
    model: wire.ModelInfo,
    sink: Sink | None = None,
    slots: int | None = None,
    embeddings: bool | None = None,
) -> LoadedModel:
    """Load ``model`` with the settings' context, offload and threads, and ``slots`` sequences
    at once (default: the settings'; 0 chooses from memory), and an embedding context when
    ``embeddings`` (default: the settings').  ``sink`` receives each engine step's events
    (default: per-request queues, for :meth:`LoadedModel.generate`)."""
    # llama_cpp is slow to import: only what loads a model pays for it
    from haifctl.runtime.llamacpp import LlamaCppRuntime

    options = LoadOptions(
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        threads=settings.threads,
        threads_batch=settings.threads_batch,
        flash_attn=settings.flash_attn,
        slots=settings.slots if slots is None else slots,
        embeddings=settings.embeddings if embeddings is None else embeddings,
    )
    return LlamaCppRuntime().load(Path(model.path), options, sink)


def render_prompt(request: InferenceRequest, loaded: LoadedModel) -> str | list[int]:
    """The prompt as the engine takes it: text (a plain prompt, or chat messages through the
    model's template), or token ids (given as such, or a fill-in-the-middle prompt)."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    if request.suffix is not None:
        return loaded.infill(request.prompt or "", request.suffix)
    messages = request.chat_messages()
    if messages is None:
        return request.prompt or ""
    return build_prompt(
        messages,
        loaded.info.chat_template,
        bos_token=loaded.info.bos_token,
        eos_token=loaded.info.eos_token,
        tools=request.tools,
    )


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


class Generation:
    """One completion as it happens: its text, token counts and timings.

    The clock starts when the generation is made.  Feed it the token events as they come
    (:meth:`record`), from a model in this process or from a stream off the wire; the last event
    (the one with a ``finish_reason``) stops the clock.
    """

    def __init__(self, model: str, load_ms: float = 0.0, keep_text: bool = True) -> None:
        self.model = model
        self.keep_text = keep_text  # a worker streams its text away: it only needs the clock
        self.load_ms = load_ms
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.finished: float | None = None
        self.finish_reason: str | None = None
        self.n_tokens = 0  # as counted from the events so far
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._text: list[str] = []

    def record(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        if self.first_token is None and event.n_tokens:
            self.first_token = now
        if self.keep_text:
            self._text.append(event.text)
        self.n_tokens += event.n_tokens
        if event.finish_reason is not None:
            self.finished = now
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens
            self.completion_tokens = event.completion_tokens

    def stop(self, prompt_tokens: int = 0) -> None:
        """End a generation whose stream was cut short, with what it produced so far."""
        if self.finished is None:
            self.record(
                TokenEvent(
                    text="",
                    finish_reason="cancelled",
                    prompt_tokens=prompt_tokens,
                    completion_tokens=self.n_tokens,
                )
            )

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def ttft_ms(self) -> float | None:
        """Time to the first token."""
        if self.first_token is None:
            return None
        return round((self.first_token - self.started) * 1000, 3)

    @property
    def generation_ms(self) -> float:
        """From the start to the last token (or to now, while it runs)."""
        return round((self._end() - self.started) * 1000, 3)

    @property
    def tokens_per_second(self) -> float:
        """Over the decode phase (after the first token), as llama.cpp reports it."""
        decode = self._end() - (self.first_token or self.started)
        tokens = self.completion_tokens if self.finished is not None else self.n_tokens
        return round((tokens - 1) / decode, 1) if tokens > 1 and decode > 0 else 0.0

    def _end(self) -> float:
        return self.finished if self.finished is not None else time.perf_counter()

    def completion(self, served_by: str = "in-process", worker: str | None = None) -> Completion:
        return Completion(
            model=self.model,
            text=self.text,
            finish_reason=self.finish_reason or "cancelled",
            usage=Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
            ),
            timings=Timings(
                load_ms=round(self.load_ms, 3),
                time_to_first_token_ms=self.ttft_ms,
                generation_ms=self.generation_ms,
                tokens_per_second=self.tokens_per_second,
            ),
            served_by=served_by,
            worker=worker,
        )


class LocalGeneration(Generation):
    """A generation on a model loaded in this process: iterate it for its token events."""

    def __init__(
        self,
        model: wire.ModelInfo,
        loaded: LoadedModel,
        request: InferenceRequest,
        max_tokens: int,
        load_ms: float = 0.0,
    ) -> None:
        params = request.sampling(model.params, max_tokens)
        prompt = render_prompt(request, loaded)
        self._prompt_tokens = (
            len(prompt) if isinstance(prompt, list) else loaded.count_tokens(prompt)
        )
        super().__init__(model.ref, load_ms)
        self.cancel_token = CancelToken()
        self._events = loaded.generate(prompt, params, self.cancel_token)

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for event in self._events:
                self.record(event)
                yield event
        finally:
            self.close()

    def cancel(self) -> None:
        """Stop generating; what was produced so far ends as ``cancelled``."""
        self.cancel_token.cancel()
        if self.finished is None:
            # The runtime's stream may already be dead (an interrupt raised inside it): then
            # there is no closing event to wait for, and the counts come from what was seen.
            for _ in self:
                pass
            # The engine may have made every token before the interrupt (they waited in the
            # stream while the caller wrote text out): the caller still stopped short of them.
            self.finish_reason = "cancelled"
        self.stop(self._prompt_tokens)

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
