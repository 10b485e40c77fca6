"""Engines: what decodes tokens with a loaded model, behind one small interface.

An engine owns one thread that owns every native call on its context (llama.cpp's thread pool
stays warm; nothing else touches the context).  Callers hand it :class:`Job` objects from any
thread; the engine runs them (several at once when it has several slots) and, once per step, hands
*every* event of that step to its sink in one call.  The sink runs on the engine thread: the worker
turns a step into one frame per destination, the in-process API routes events to per-job queues.

:class:`Emitter` is the one place that turns sampled tokens into text: UTF-8 across token
boundaries, stop strings (never showing part of one), end of generation and the token budget.
"""

from __future__ import annotations

import codecs
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from haifctl.errors import HaifError, InvalidInput
from haifctl.runtime.base import (
    CancelToken,
    DeviceFacts,
    ModelInfo,
    SamplingParams,
    StopScanner,
    TokenEvent,
)


class Job:
    """One sequence: prompt tokens in, events out.  ``tag`` belongs to whoever submitted it."""

    __slots__ = ("budget", "cancel", "params", "prompt", "tag")

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        budget: int,
        tag: Any = None,
        cancel: CancelToken | None = None,
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.budget = budget
        self.tag = tag
        self.cancel = cancel or CancelToken()


Step = list[tuple[Job, TokenEvent]]
Sink = Callable[[Step], None]


def deliver_to_queues(step: Step) -> None:
    """The in-process sink: each job's ``tag`` is the queue its consumer reads."""
    for job, event in step:
        job.tag.put(event)


class Emitter:
    """Text, stop strings, end of generation and budget for one job, written once for every
    engine."""

    __slots__ = ("_decoder", "_eog", "_piece", "_scanner", "budget", "ignore_eos", "produced")

    def __init__(
        self,
        params: SamplingParams,
        budget: int,
        is_eog: Callable[[int], bool],
        piece: Callable[[int], bytes],
    ) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._scanner = StopScanner(params.stop)
        self._eog = is_eog
        self._piece = piece
        self.ignore_eos = params.ignore_eos
        self.budget = budget
        self.produced = 0

    def token(self, token: int, room: bool = True) -> tuple[str, str | None]:
        """Account for one sampled token: the text it settles and the finish reason, if it
        ends the sequence.  ``room`` False: the context is full after this token."""
        if not self.ignore_eos and self._eog(token):
            return "", "stop"
        self.produced += 1
        text = self._scanner.feed(self._decoder.decode(self._piece(token)))
        if self._scanner.stopped:
            return text, "stop"
        if self.produced >= self.budget or not room:
            return text + self.tail(), "length"
        return text, None

    def tail(self) -> str:
        """Held-back text at the end of a sequence that did not stop on a stop string."""
        return self._scanner.flush() + self._decoder.decode(b"", final=True)


class Engine(ABC):
    """Runs jobs on one thread.  Subclasses build their native state, then call
    :meth:`start_thread` last; :meth:`close` stops the thread before freeing anything."""

    slots: int = 1

    def __init__(self, sink: Sink | None = None) -> None:
        self.sink: Sink = sink or deliver_to_queues
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # any thread ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self._closed:
            raise HaifError("model_closed", "the model has been unloaded")
        self._inbox.put(job)

    def generate(self, job: Job) -> Iterator[TokenEvent]:
        """Run ``job`` and yield its events (for engines whose sink delivers to queues);
        leaving early cancels it."""
        events: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()
        job.tag = events
        self.submit(job)
        try:
            while True:
                item = events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancel.cancel()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()
        self.free()

    @property
    def alive(self) -> bool:
        """The engine thread runs (false once closed, or if it ever died)."""
        return self._thread is not None and self._thread.is_alive()

    # the engine thread -----------------------------------------------------------------------
    def start_thread(self, name: str) -> None:
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        waiting: list[Job] = []
        while True:
            block = not waiting and not self.busy()
            try:
                while True:
                    job = self._inbox.get(block=block)
                    block = False
                    if job is None:
                        self._fail_all(waiting, HaifError("model_closed", "the model was unloaded"))
                        return
                    waiting.append(job)
            except queue.Empty:
                pass
            try:
                step = self.step(waiting)
            except BaseException as exc:  # handed to every consumer, never lost
                self._fail_all(waiting, exc)
                continue
            if step:
                try:
                    self.sink(step)
                except Exception as exc:  # a sink bug must not stop the engine
                    self.sink_failed(exc)

    def _fail_all(self, waiting: list[Job], exc: BaseException) -> None:
        jobs = self.abort() + waiting
        waiting.clear()
        for job in jobs:
            if isinstance(job.tag, queue.SimpleQueue):
                job.tag.put(exc)
        failed = [j for j in jobs if not isinstance(j.tag, queue.SimpleQueue)]
        if failed:
            error = exc if isinstance(exc, HaifError) else HaifError("internal_error", repr(exc))
            event = TokenEvent(
                text="",
                finish_reason="error",
                error=error.code,
                kind=error.kind.value,
                message=error.message,
            )
            self.sink([(job, event) for job in failed])

    def sink_failed(self, exc: Exception) -> None:
        import sys

        sys.stderr.write(f"engine sink failed: {exc!r}\n")

    @abstractmethod
    def busy(self) -> bool:
        """Whether any job is running (the loop then polls its inbox instead of waiting)."""

    @abstractmethod
    def step(self, waiting: list[Job]) -> Step:
        """Admit what fits from ``waiting`` (removing it), run one step, return its events."""

    @abstractmethod
    def abort(self) -> list[Job]:
        """Drop every running job (after a failed step or at close); return them."""

    @abstractmethod
    def free(self) -> None:
        """Free native state; the thread has stopped."""


class Model(ABC):
    """A loaded model and its engine: what every runtime's model shares (sizing a request for
    the engine, streaming one in-process); runtimes supply tokenising and closing."""

    info: ModelInfo
    device: DeviceFacts
    engine: Engine
    slots: int
    _closed = False

    @abstractmethod
    def tokenize(self, prompt: str) -> list[int]: ...

    @abstractmethod
    def close(self) -> None: ...

    # What a model does besides generating: tokens both ways, embeddings.  Each may be called
    # from any thread; none touches the engine's context.
    def tokenize_text(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """``text`` as the tokeniser splits it, with the beginning-of-text token in front when
        ``add_special``, reading special tokens' text as those tokens when ``parse_special``."""
        raise InvalidInput("tokenize_unsupported", "this runtime cannot tokenize")

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (special tokens as their text); an id outside the
        vocabulary is refused."""
        raise InvalidInput("tokenize_unsupported", "this runtime cannot detokenize")

    def token_piece(self, token: int) -> bytes:
        """One token's bytes (a token may hold part of a character)."""
        raise InvalidInput("tokenize_unsupported", "this runtime cannot detokenize")

    def check_tokens(self, tokens: list[int], where: str) -> None:
        n_vocab = self.info.n_vocab
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidInput(
                "invalid_token", f"{where}: token {bad} is not in the vocabulary of {n_vocab}"
            )

    @property
    def embeddings(self) -> bool:
        """Whether :meth:`embed` works: the model was loaded with embeddings."""
        return False

    @property
    def n_embd(self) -> int:
        """The size of an embedding vector (0 without embeddings)."""
        return 0

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """One L2-normalised vector per input (a text, or token ids) and the tokens read."""
        raise InvalidInput(
            "embeddings_disabled",
            f"{self.info.path} was loaded without embeddings",
            "start the worker with --embeddings (or set HAIF_EMBEDDINGS=1)",
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def infill(self, prefix: str, suffix: str) -> list[int]:
        """A fill-in-the-middle prompt: what comes before and after the text to write."""
        raise InvalidInput(
            "infill_unsupported",
            "suffix: this model has no fill-in-the-middle tokens",
            "send the prompt without a suffix, or use a code model trained for infilling",
        )

    def check_params(self, params: SamplingParams) -> None:
        """Refuse what the engine could not honour (a token id outside the vocabulary, a
        grammar that does not parse) before the job is queued."""
        n_vocab = self.info.n_vocab
        bad = next((t for t in params.logit_bias if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidInput(
                "invalid_token", f"logit_bias: token {bad} is not in the vocabulary of {n_vocab}"
            )

    def job(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        cancel: CancelToken | None = None,
        tag: Any = None,
    ) -> Job:
        """Tokenise and size a request for the engine; a prompt that does not fit is refused.
        ``prompt`` may be token ids already (each checked against the vocabulary)."""
        if self._closed:
            raise HaifError("model_closed", "the model has been unloaded")
        if isinstance(prompt, list):
            tokens = prompt
            self.check_tokens(tokens, "prompt")
        else:
            tokens = self.tokenize(prompt)
        self.check_params(params)
        n_ctx = self.info.n_ctx
        if len(tokens) >= n_ctx:
            raise InvalidInput(
                "prompt_too_long",
                f"the prompt is {len(tokens)} tokens; the context window holds {n_ctx}",
                "shorten the prompt or raise --n-ctx (up to the model's trained context)",
            )
        return Job(tokens, params, min(params.max_tokens, n_ctx - len(tokens)), tag, cancel)

    def generate(
        self, prompt: str | list[int], params: SamplingParams, cancel: CancelToken | None = None
    ) -> Iterator[TokenEvent]:
        """Stream the completion of ``prompt``.  Closing the iterator stops generation."""
        return self.engine.generate(self.job(prompt, params, cancel))


LoadedModel = Model  # what callers hold: a model in memory and the engine that decodes with it
