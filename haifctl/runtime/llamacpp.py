"""llama.cpp through llama-cpp-python: CPU, CUDA or Metal, whichever the installed build has."""

from __future__ import annotations

import codecs
import os
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from haifctl.errors import HaifError, InvalidInput
from haifctl.runtime.base import (
    CancelToken,
    DeviceFacts,
    LoadOptions,
    ModelInfo,
    SamplingParams,
    StopScanner,
    TokenEvent,
)


def gpu_backend() -> tuple[str, bool]:
    """Which accelerator the installed llama.cpp build can offload to."""
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "ROCM", "HIP", "SYCL"):
        if offload and f"{name} :" in info:
            return name.lower(), offload
    return ("gpu" if offload else "cpu"), offload


class LlamaCppModel:
    """One GGUF model loaded by llama.cpp.  Owns its native handles: call :meth:`close`."""

    def __init__(self, path: Path, options: LoadOptions) -> None:
        import llama_cpp

        backend, offload = gpu_backend()
        threads = options.threads or max(1, min(os.cpu_count() or 1, 8))
        n_ctx_train = options.n_ctx_train
        if n_ctx_train is None:
            from haifctl.gguf_info import read_facts

            n_ctx_train = read_facts(path).context_length
        # A context beyond the trained one only produces garbage, and llama.cpp would allocate
        # its KV cache all the same: cap it.
        n_ctx = min(options.n_ctx, n_ctx_train) if n_ctx_train else options.n_ctx
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_gpu_layers=options.n_gpu_layers if offload else 0,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise HaifError(
                "model_load_failed",
                f"llama.cpp could not load {path}: {exc}",
                "check that the file is a complete GGUF that this llama.cpp build supports",
            ) from None
        model: Any = self._llama._model
        n_ctx_train = int(model.n_ctx_train())
        self._model = model
        self._vocab = model.vocab
        self._eog = llama_cpp.llama_vocab_is_eog
        meta = self._llama.metadata
        bos, eos = self._llama.token_bos(), self._llama.token_eos()
        self.info = ModelInfo(
            path=str(path),
            n_ctx=int(self._llama.n_ctx()),
            n_ctx_train=n_ctx_train,
            n_vocab=int(self._llama.n_vocab()),
            bos_token=model.token_get_text(bos) if bos >= 0 else None,
            eos_token=model.token_get_text(eos) if eos >= 0 else None,
            chat_template=meta.get("tokenizer.chat_template") or None,
        )
        self.device = DeviceFacts(
            backend=backend,
            gpu_offload=offload and options.n_gpu_layers != 0,
            n_gpu_layers=options.n_gpu_layers if offload else 0,
            threads=threads,
        )
        # One llama.cpp context holds one KV cache; until batched decoding lands, the model
        # serves one sequence at a time.  Every llama.cpp call runs on one engine thread: its
        # OpenMP team stays warm, where a call from a fresh thread each time builds a new team
        # and runs several times slower.
        self.slots = 1
        self._jobs: queue.Queue[Any] = queue.Queue()  # _Job items; a subclass queues its own
        self._closed = False
        self._engine = threading.Thread(target=self._engine_loop, name="llama-engine", daemon=True)
        self._engine.start()

    def _tokenize(self, prompt: str) -> list[int]:
        bos = self.info.bos_token
        templated = bool(bos) and prompt.startswith(bos or "")
        tokens: list[int] = self._llama.tokenize(
            prompt.encode("utf-8"), add_bos=not templated, special=templated
        )
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def generate(
        self, prompt: str, params: SamplingParams, cancel: CancelToken | None = None
    ) -> Iterator[TokenEvent]:
        """Stream the completion of ``prompt``.  Closing the iterator stops generation."""
        if self._closed:
            raise HaifError("model_closed", "the model has been unloaded")
        prompt_tokens = self._tokenize(prompt)
        n_ctx = self.info.n_ctx
        if len(prompt_tokens) >= n_ctx:
            raise InvalidInput(
                "prompt_too_long",
                f"the prompt is {len(prompt_tokens)} tokens; the context window holds {n_ctx}",
                "shorten the prompt or raise --n-ctx (up to the model's trained context)",
            )
        budget = min(params.max_tokens, n_ctx - len(prompt_tokens))
        return self._submit(self._new_job(prompt_tokens, params, budget, cancel))

    def _new_job(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        budget: int,
        cancel: CancelToken | None,
    ) -> Any:
        return _Job(prompt_tokens, params, budget, cancel)

    def _submit(self, job: Any) -> Iterator[TokenEvent]:
        """Hand a job to the engine thread; yield its events as they come back."""
        self._jobs.put(job)
        try:
            while True:
                item = job.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.abandoned = True  # the consumer left: stop at the next token

    def _engine_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                for event in self._run(job):
                    job.events.put(event)
            except BaseException as exc:  # handed to the consumer, never lost
                job.events.put(exc)

    def _run(self, job: _Job) -> Iterator[TokenEvent]:
        llama = self._llama
        params = job.params
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(params.stop)
        history = list(job.prompt_tokens)  # prompt + output: context for detokenizing
        produced = 0
        finish = "length"
        tokens = llama.generate(
            job.prompt_tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        )
        try:
            for token in tokens if job.budget > 0 else ():
                if job.abandoned or (job.cancel is not None and job.cancel.cancelled):
                    finish = "cancelled"
                    break
                if not params.ignore_eos and self._eog(self._vocab, token):
                    finish = "stop"
                    break
                piece = llama.detokenize([token], prev_tokens=history, special=False)
                history.append(token)
                produced += 1
                text = scanner.feed(decoder.decode(piece))
                if scanner.stopped:
                    finish = "stop"
                    if text:
                        yield TokenEvent(text=text, n_tokens=1)
                    break
                if text:
                    yield TokenEvent(text=text, n_tokens=1)
                if produced >= job.budget:
                    break
        finally:
            tokens.close()
        tail = scanner.flush() + decoder.decode(b"", final=True) if finish != "stop" else ""
        yield TokenEvent(
            text=tail,
            finish_reason=finish,
            prompt_tokens=len(job.prompt_tokens),
            completion_tokens=produced,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._engine.join()
            self._llama.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Job:
    """One generation handed to the engine thread, and the queue its events come back on."""

    def __init__(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        budget: int,
        cancel: CancelToken | None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.budget = budget
        self.cancel = cancel
        self.abandoned = False
        self.events: queue.Queue[TokenEvent | BaseException] = queue.Queue()


class LlamaCppRuntime:
    name = "llama.cpp"

    def load(self, path: Path, options: LoadOptions) -> LlamaCppModel:
        if options.slots > 1:
            from haifctl.runtime.batched import BatchedLlamaCppModel

            return BatchedLlamaCppModel(path, options)
        return LlamaCppModel(path, options)
