"""A synthetic runtime: no weights, a fixed vocabulary, and an engine that takes a set time per
step.  It is the second implementation of the engine interface, for tests and simulations that
need an engine's behaviour (slots, continuous batching, budgets, stops, cancellation) without
llama.cpp's cost, such as measuring what the relays cost per token on their own.
"""

from __future__ import annotations

import time
from pathlib import Path

from haifctl.errors import HaifError
from haifctl.runtime.base import (
    DeviceFacts,
    LoadOptions,
    ModelInfo,
    TokenEvent,
)
from haifctl.runtime.engine import Emitter, Engine, Job, Model, Sink, Step

WORDS = ("once", "upon", "a", "time", "there", "was", "little", "fox", "who", "ran", "far", ".")
EOS = len(WORDS)


class SyntheticModel(Model):
    """Tokens are the words of :data:`WORDS` (each followed by a space); generation cycles
    through them, so a sequence's text is known in advance."""

    def __init__(self, options: LoadOptions, sink: Sink | None = None, step_s: float = 0.0) -> None:
        n_ctx = options.n_ctx
        self.info = ModelInfo(
            path="synthetic",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx,
            n_vocab=EOS + 1,
            bos_token=None,
            eos_token=None,
            chat_template=None,
        )
        self.device = DeviceFacts(backend="cpu", gpu_offload=False, n_gpu_layers=0, threads=1)
        self.engine: Engine = SyntheticEngine(self, max(1, options.slots), sink, step_s)
        self.slots = self.engine.slots

    def tokenize(self, prompt: str) -> list[int]:
        index = {w: i for i, w in enumerate(WORDS)}
        return [index.get(w, 0) for w in prompt.split()] or [0]

    def piece(self, token: int) -> bytes:
        return (WORDS[token] + " ").encode() if token < EOS else b""

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.close()


class _Seq:
    __slots__ = ("emitter", "job", "next", "reported")

    def __init__(self, job: Job, emitter: Emitter, first: int) -> None:
        self.job = job
        self.emitter = emitter
        self.next = first
        self.reported = 0


class SyntheticEngine(Engine):
    """Continuous batching over ``slots`` sequences; each step takes ``step_s`` and gives every
    running sequence its next word (after the prompt's last, cycling; end of text after ".")."""

    def __init__(self, model: SyntheticModel, slots: int, sink: Sink | None, step_s: float) -> None:
        super().__init__(sink)
        self.model = model
        self.slots = slots
        self.step_s = step_s
        self._running: list[_Seq] = []
        self.start_thread("synthetic-engine")

    def busy(self) -> bool:
        return bool(self._running)

    def step(self, waiting: list[Job]) -> Step:
        out: Step = []
        while waiting and len(self._running) < self.slots:
            job = waiting.pop(0)
            emitter = Emitter(job.params, job.budget, self.model.is_eog, self.model.piece)
            self._running.append(_Seq(job, emitter, (job.prompt[-1] + 1) % (EOS + 1)))
        if not self._running:
            return out
        if self.step_s:
            time.sleep(self.step_s)  # stands in for a decode's compute
        for seq in list(self._running):
            if seq.job.cancel.cancelled:
                self._end(seq, "cancelled", "", out)
                continue
            token = seq.next
            seq.next = (token + 1) % (EOS + 1)
            text, done = seq.emitter.token(token)
            if done is None:
                seq.reported += 1
                out.append((seq.job, TokenEvent(text=text, n_tokens=1)))
            else:
                self._end(seq, done, text, out)
        return out

    def _end(self, seq: _Seq, reason: str, text: str, out: Step) -> None:
        self._running.remove(seq)
        n = seq.emitter.produced
        out.append(
            (
                seq.job,
                TokenEvent(
                    text=text,
                    n_tokens=n - seq.reported,
                    finish_reason=reason,
                    prompt_tokens=len(seq.job.prompt),
                    completion_tokens=n,
                ),
            )
        )

    def abort(self) -> list[Job]:
        jobs = [s.job for s in self._running]
        self._running.clear()
        return jobs

    def free(self) -> None:
        self.abort()


class SyntheticRuntime:
    name = "synthetic"

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s

    def load(self, path: Path, options: LoadOptions, sink: Sink | None = None) -> SyntheticModel:
        if str(path) not in ("synthetic", ""):
            raise HaifError("model_load_failed", "the synthetic runtime loads no file")
        return SyntheticModel(options, sink, self.step_s)
