"""Several sequences of one model at once: llama.cpp batched decoding, one sequence id per
request, as llama-server's parallel slots do.  Throughput grows with concurrent requests
instead of queueing them one by one.

One engine thread owns the llama.cpp context.  Each step it admits waiting requests into free
slots, feeds their prompts (in chunks of ``n_batch``) and every running sequence's last token into
one batch, decodes once, and samples the next token of each sequence with that sequence's own
sampler chain.
"""

from __future__ import annotations

import codecs
import importlib
import queue
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haifctl.errors import HaifError
from haifctl.runtime.base import (
    CancelToken,
    LoadOptions,
    SamplingParams,
    StopScanner,
    TokenEvent,
)
from haifctl.runtime.llamacpp import LlamaCppModel

N_BATCH = 512


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    budget: int
    cancel: CancelToken | None
    events: queue.Queue[TokenEvent | BaseException] = field(default_factory=queue.Queue)
    abandoned: bool = False
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    n_past: int = 0
    last: int = -1  # the token to feed next (the one just sampled)
    produced: int = 0
    sampler: Any = None
    decoder: Any = None
    scanner: StopScanner | None = None

    def finish(self, reason: str, tail: str = "") -> None:
        self.events.put(
            TokenEvent(
                text=tail,
                finish_reason=reason,
                prompt_tokens=len(self.prompt),
                completion_tokens=self.produced,
            )
        )


class BatchedLlamaCppModel(LlamaCppModel):
    """A llama.cpp model serving up to ``slots`` sequences concurrently."""

    def __init__(self, path: Path, options: LoadOptions) -> None:
        import llama_cpp

        internals: Any = importlib.import_module("llama_cpp._internals")
        self._slots_n = max(2, options.slots)
        super().__init__(path, options)  # loads the model; its own context serves tokenising
        per_seq = self.info.n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_seq * self._slots_n
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = self._slots_n
        params.n_threads = self.device.threads
        params.n_threads_batch = self.device.threads
        try:
            self._bctx: Any = internals.LlamaContext(
                model=self._llama._model, params=params, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            super().close()
            raise HaifError(
                "model_load_failed", f"cannot create a {self._slots_n}-slot context: {exc}"
            ) from None
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.slots = self._slots_n
        self._free = list(range(self._slots_n))

    def _new_job(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        budget: int,
        cancel: CancelToken | None,
    ) -> _Seq:
        return _Seq(prompt_tokens, params, budget, cancel)

    def _engine_loop(self) -> None:
        running: list[_Seq] = []
        waiting: list[_Seq] = []
        while True:
            block = not running and not waiting
            try:
                while True:
                    job = self._jobs.get(block=block)
                    block = False
                    if job is None:
                        for seq in running + waiting:
                            seq.events.put(HaifError("model_closed", "the model was unloaded"))
                        return
                    waiting.append(job)
            except queue.Empty:
                pass
            try:
                self._step(running, waiting)
            except BaseException as exc:  # handed to every consumer, never lost
                for seq in running:
                    self._release(seq)
                    seq.events.put(exc)
                running.clear()

    def _start(self, seq: _Seq) -> None:
        internals: Any = importlib.import_module("llama_cpp._internals")
        p = seq.params
        sampler = internals.LlamaSampler()
        sampler.add_penalties(
            n_vocab=self.info.n_vocab,
            penalty_last_n=64,
            penalty_repeat=p.repeat_penalty,
            penalty_freq=0.0,
            penalty_present=0.0,
        )
        if p.temperature == 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(p.top_k)
            sampler.add_top_p(p.top_p, 1)
            sampler.add_min_p(p.min_p, 1)
            sampler.add_temp(p.temperature)
            sampler.add_dist(p.seed if p.seed is not None else random.getrandbits(31))
        seq.sampler = sampler
        seq.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        seq.scanner = StopScanner(p.stop)
        seq.slot = self._free.pop()
        self._bctx.kv_cache_seq_rm(seq.slot, -1, -1)

    def _release(self, seq: _Seq) -> None:
        if seq.slot >= 0:
            self._bctx.kv_cache_seq_rm(seq.slot, -1, -1)
            self._free.append(seq.slot)
            seq.slot = -1
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None

    def _step(self, running: list[_Seq], waiting: list[_Seq]) -> None:
        import llama_cpp

        for seq in list(running):
            if seq.abandoned or (seq.cancel is not None and seq.cancel.cancelled):
                running.remove(seq)
                self._release(seq)
                seq.finish("cancelled")
        while waiting and self._free:
            seq = waiting.pop(0)
            if seq.abandoned:
                continue
            if seq.budget <= 0:
                seq.finish("length")
                continue
            self._start(seq)
            running.append(seq)
        if not running:
            return
        batch = self._batch
        n = 0
        outputs: list[tuple[_Seq, int]] = []
        for seq in running:  # one token for every sequence that is generating
            if seq.fed == len(seq.prompt) and n < N_BATCH:
                self._put(batch, n, seq.last, seq.n_past, seq.slot, True)
                outputs.append((seq, n))
                n += 1
        for seq in running:  # then prompt chunks, as room allows
            while seq.fed < len(seq.prompt) and n < N_BATCH:
                last = seq.fed == len(seq.prompt) - 1
                self._put(batch, n, seq.prompt[seq.fed], seq.fed, seq.slot, last)
                if last:
                    outputs.append((seq, n))
                seq.fed += 1
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._bctx.ctx, batch)
        if rc != 0:
            raise HaifError("decode_failed", f"llama_decode returned {rc}")
        for seq, index in outputs:
            if seq.fed == len(seq.prompt) and seq.n_past < len(seq.prompt):
                seq.n_past = len(seq.prompt)
            elif seq.last >= 0:
                seq.n_past += 1
            token = llama_cpp.llama_sampler_sample(seq.sampler.sampler, self._bctx.ctx, index)
            self._emit(seq, token, running)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _emit(self, seq: _Seq, token: int, running: list[_Seq]) -> None:
        assert seq.scanner is not None
        done: str | None = None
        text = ""
        if not seq.params.ignore_eos and self._eog(self._vocab, token):
            done = "stop"
        else:
            seq.produced += 1
            piece = self._llama.detokenize([token], special=False)
            text = seq.scanner.feed(seq.decoder.decode(piece))
            if seq.scanner.stopped:
                done = "stop"
            elif seq.produced >= seq.budget or seq.n_past + 1 >= self.info.n_ctx:
                done = "length"
        if text:
            seq.events.put(TokenEvent(text=text, n_tokens=1))
        if done is None:
            seq.last = token
            return
        tail = "" if done == "stop" else seq.scanner.flush() + seq.decoder.decode(b"", final=True)
        running.remove(seq)
        self._release(seq)
        seq.finish(done, tail)

    def close(self) -> None:
        if not self._closed:
            super().close()  # stops the engine thread first
            import llama_cpp

            llama_cpp.llama_batch_free(self._batch)
            self._bctx.close()
