"""The interface every model runtime implements, and the pieces they share.

A runtime loads a model file into a :class:`LoadedModel`: the weights and tokeniser, and an
engine (:mod:`haifctl.runtime.engine`) that turns prompts into streams of :class:`TokenEvent`,
several at once (``slots``): nothing here assumes one request at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    from haifctl.runtime.engine import Model, Sink

FinishReason = str  # "stop" (end of text or a stop string), "length", "cancelled", "error"


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens.  Defaults follow llama.cpp's."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    # OpenAI's penalties: subtracted from a token's logit once it appeared (presence), and per
    # time it appeared (frequency), over the last tokens generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Keep going past end-of-text: fixed-length output for benchmarks and tests.
    ignore_eos: bool = False
    grammar: str = ""  # GBNF the output must follow
    logprobs: int = -1  # -1: none; else report each token's logprob and this many alternatives


FLASH_ATTN_CHOICES = ("auto", "on", "off")


class LoadOptions(msgspec.Struct, frozen=True, kw_only=True):
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    threads: int = 0  # 0: let the runtime decide
    # threads for steps that feed prompts (compute-bound); 0: the same as ``threads``
    threads_batch: int = 0
    flash_attn: str = "auto"  # "on", "off" or "auto" (the runtime decides per model and device)
    slots: int = 1  # sequences decoded at once; 0: as many as memory allows (up to a cap)
    # A second context, made for embeddings (pooled, one input at a time): Model.embed.
    embeddings: bool = False


class TokenEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a generation.  The last event of a stream has ``finish_reason`` set and
    carries the usage counts; its ``text`` may be empty."""

    text: str
    n_tokens: int = 0
    finish_reason: FinishReason | None = None
    logprobs: list[Any] | None = None  # wire.TokenLogprob per token, when asked for
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # finish_reason "error": the engine failed this sequence (the error's code, kind, message)
    error: str = ""
    kind: str = ""
    message: str = ""


class DeviceFacts(msgspec.Struct, frozen=True, kw_only=True):
    backend: str  # "cpu", "cuda", "metal", ...
    gpu_offload: bool
    n_gpu_layers: int
    threads: int
    threads_batch: int = 0  # for steps that feed prompts; 0: as threads
    flash_attn: str = "off"  # "on", "off", or "auto" where the device's build decides
    # prompts fed with flash attention in a context of their own, their cache then handed to the
    # generating context (which has none): runtime.llamacpp.Prefill
    flash_prefill: bool = False


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None


class CancelToken:
    """Set from any thread to stop a generation at the next token."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Runtime(Protocol):
    name: str

    def load(self, path: Path, options: LoadOptions, sink: Sink | None = None) -> Model: ...


class StopScanner:
    """Finds stop strings in streamed text without ever showing part of one.

    Text that could still turn into a stop string is held back until the next piece settles it.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add ``text``; return what is safe to show now.  Sets ``stopped`` on a match."""
        if not self.stops:
            return text
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The held-back text, once the stream ends without a stop."""
        out, self._pending = self._pending, ""
        return out
