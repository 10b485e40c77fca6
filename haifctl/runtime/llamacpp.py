"""llama.cpp through llama-cpp-python: CPU, CUDA or Metal, whichever the installed build has.

:class:`LlamaCppModel` is the loaded model: weights, vocabulary and tokeniser, and no KV cache of
its own.  :class:`BatchEngine` decodes with it: one llama.cpp context with one sequence id per
slot, continuous batching (requests join the running batch at every step, as llama-server's
parallel slots do), prompts fed in chunks so a long prompt never stalls the others' next token.
With one slot it is the sequential engine: the same code path, one sequence at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from haifctl.errors import HaifError, InvalidInput
from haifctl.files import open_regular
from haifctl.runtime.base import (
    FLASH_ATTN_CHOICES,
    DeviceFacts,
    LoadOptions,
    ModelInfo,
    SamplingParams,
    TokenEvent,
)
from haifctl.runtime.engine import Emitter, Engine, Job, Model, Sink, Step

N_BATCH = 512  # tokens per llama_decode: generating sequences first, then prompt chunks
PENALTY_LAST_N = 64
# A step feeding at least this many prompt tokens runs on threads_batch threads, the others on
# threads (llama.cpp alone would take threads_batch for every step of more than one token,
# sequences generating side by side included).
THREADS_BATCH_MIN_TOKENS = 32
# A step starts feeding another prompt only while it holds fewer prompt tokens than this: when
# prompts arrive together, each first token goes out after its own prompt rather than after a
# step that feeds several, and the sequences already generating wait less for their next token
# (8 streams of 136-token prompts, bench/ab.sh against the same build without: TTFT p50 0.91x,
# p99 0.49x, tokens/s 1.01x).
# Short prompts still share a step; one longer than N_BATCH is fed N_BATCH tokens a step.
PROMPT_TOKENS_PER_STEP = 128
# Below this head size, llama.cpp's CPU flash-attention kernel costs more per KV cell than it
# saves (head size 8, the shipped model: 2.9x slower generation, 3.4x faster prompts); at 64 it
# is faster at both (bench/attention.py).
FLASH_ATTN_MIN_HEAD_DIM = 32
# Prompts at least this long go through Prefill (where it is on); shorter ones are fed with the
# generating sequences.  One thread, the shipped model, one decode of the first N tokens of a
# prompt, flash against plain (python bench/prefill.py): 8 tokens 0.40 against 0.73 ms,
# 24: 1.86/2.25, 48: 4.01/4.29 (another run: 6.02/4.63), 64: 1.96/5.78, 96: 3.69/8.82
# (llama.cpp's flash kernel changes method between 48 and 64).
# Below 64 the gain is about what moving the cache costs (0.3 ms for 133 tokens) and a decode of
# its own, not shared with the generating sequences.
PREFILL_MIN_TOKENS = 64
# While the prefill context has a prompt to feed, the generating sequences skip steps for up to
# this long: prompts that arrive together (a burst of users) are fed back to back, and the
# sequences already generating lose a few milliseconds, less than a worker holds a running
# stream's text anyway (HAIF_STREAM_INTERVAL_MS, 20 by default).
GENERATION_HOLD_S = 0.015
# llama.cpp's CPU threads are OpenMP's (libgomp).  Between parallel steps its idle threads spin
# 300,000 times (about 10 ms on this machine) before they sleep: after each step that fed a
# prompt on threads_batch threads, the extra threads kept their cores that long, and the relays
# carrying the first token waited for a core (one stream of 133-token prompts, timestamps at
# each hop: worker to orchestrator 2.9 ms, against 0.4 with 10,000 spins).  10,000 spins, a
# fraction of a millisecond, still cover the gap from one decode to the next.  libgomp reads
# this once, when llama.cpp loads, so it is set on this module's import; the user's own
# GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
OMP_SPIN_COUNT = 10_000
GGML_F32, GGML_F16 = 0, 1  # ggml's type ids (llama_cpp.GGML_TYPE_*, without importing it here)
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)


def cpus_to_pin(threads: int) -> list[int]:
    """The CPUs an engine's threads are pinned to, one each: all those this process may run
    on, when its threads are as many (a worker that has the machine, or the cores it was
    given, to itself; ``haifctl infer --local``).  Unpinned, llama.cpp's threads sleep after
    a few milliseconds idle, and the kernel wakes them on the CPU of the thread that wakes
    them, where they take turns at every barrier: a prompt after 100 ms idle took 2x as long
    (bench/RESULTS.md).  Fewer threads than CPUs (several workers sharing them, or a thread
    count chosen), or one thread: nothing is pinned."""
    if threads < 2 or not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return []
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) == threads else []


def gpu_backend() -> tuple[str, bool]:
    """Which accelerator the installed llama.cpp build can offload to."""
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "ROCM", "HIP", "SYCL"):
        if offload and f"{name} :" in info:
            return name.lower(), offload
    return ("gpu" if offload else "cpu"), offload


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def flash_attn(choice: str, head_dim: int, gpu_offload: bool) -> str:
    """Whether a context uses flash attention: "on" and "off" as asked; "auto" leaves it to
    llama.cpp on a GPU and, on a CPU, turns it on only for heads of FLASH_ATTN_MIN_HEAD_DIM or
    more."""
    if choice != "auto":
        return choice
    if gpu_offload:
        return "auto"
    return "on" if head_dim >= FLASH_ATTN_MIN_HEAD_DIM else "off"


def nvidia_smi(*fields: str) -> list[str]:
    """The first GPU's ``fields`` as nvidia-smi reports them (``[]`` when it cannot tell)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    query = f"--query-gpu={','.join(fields)}"
    try:
        line = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return []
    values = [v.strip() for v in line.split(",")]
    return values if len(values) == len(fields) else []


MAX_AUTO_SLOTS = 16
KV_SHARE = 0.25  # of the memory available, what automatic slots may give to KV caches


def available_memory(backend: str) -> int:
    """Bytes free for KV caches: the GPU's free memory (as nvidia-smi reports it) when the model
    is offloaded to CUDA, else the machine's available RAM."""
    if backend == "cuda":
        gpu = nvidia_smi("memory.free")
        if gpu:
            try:
                return int(float(gpu[0])) * 1024 * 1024
            except ValueError:
                pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_slots(kv_bytes_per_seq: int, memory: int) -> int:
    """How many sequences to decode at once when the user did not say: as many full-context
    KV caches as fit in a quarter of the memory available, between 1 and MAX_AUTO_SLOTS."""
    fit = int(memory * KV_SHARE) // max(1, kv_bytes_per_seq)
    return max(1, min(MAX_AUTO_SLOTS, fit))


def _internals() -> Any:
    return importlib.import_module("llama_cpp._internals")


class LlamaCppModel(Model):
    """One GGUF model loaded by llama.cpp and the engine that decodes with it.  Owns its native
    handles: call :meth:`close` (the engine stops and frees its context before the weights)."""

    def __init__(self, path: Path, options: LoadOptions, sink: Sink | None = None) -> None:
        if options.flash_attn not in FLASH_ATTN_CHOICES:
            raise InvalidInput(
                "invalid_flash_attn",
                f"flash attention must be one of {', '.join(FLASH_ATTN_CHOICES)}, "
                f"not {options.flash_attn!r}",
            )
        import llama_cpp
        import llama_cpp._logger

        llama_cpp._logger.set_verbose(False)  # llama.cpp's own log lines: errors only
        backend, offload = gpu_backend()
        threads = options.threads or default_threads()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers if offload else 0
        # llama.cpp would block forever opening a FIFO: only a regular file gets that far
        os.close(open_regular(path))
        try:
            self._model: Any = _internals().LlamaModel(
                path_model=str(path), params=mparams, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            raise HaifError(
                "model_load_failed",
                f"llama.cpp could not load {path}: {exc}",
                "check that the file is a complete GGUF that this llama.cpp build supports",
            ) from None
        model = self._model
        n_ctx_train = int(model.n_ctx_train())
        # A context beyond the trained one only produces garbage, and llama.cpp would allocate
        # its KV cache all the same: cap it.
        n_ctx = min(options.n_ctx, n_ctx_train) if n_ctx_train else options.n_ctx
        self._vocab = model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        bos, eos = model.token_bos(), model.token_eos()
        self._bos = bos
        meta = model.metadata()
        self.info = ModelInfo(
            path=str(path),
            n_ctx=n_ctx,
            n_ctx_train=n_ctx_train,
            n_vocab=int(model.n_vocab()),
            bos_token=model.token_get_text(bos) if bos >= 0 else None,
            eos_token=model.token_get_text(eos) if eos >= 0 else None,
            chat_template=meta.get("tokenizer.chat_template") or None,
        )
        gpu_offload = offload and options.n_gpu_layers != 0
        self.device = DeviceFacts(
            backend=backend,
            gpu_offload=gpu_offload,
            n_gpu_layers=options.n_gpu_layers if offload else 0,
            threads=threads,
            threads_batch=options.threads_batch or threads,
            flash_attn=flash_attn(options.flash_attn, self.head_dim, gpu_offload),
            flash_prefill=(
                options.flash_attn == "auto"
                and not gpu_offload
                and self.head_dim < FLASH_ATTN_MIN_HEAD_DIM
                and not llama_cpp.llama_model_is_recurrent(model.model)
                and not llama_cpp.llama_model_is_hybrid(model.model)
            ),
        )
        self._pieces: dict[int, bytes] = {}
        slots = options.slots
        if slots <= 0:
            per_seq = n_ctx * self.kv_bytes_per_token()
            prefill = per_seq if self.device.flash_prefill else 0
            slots = auto_slots(per_seq, available_memory(backend) - prefill)
        self._embedder: Embedder | None = None
        try:
            self.engine: Engine = BatchEngine(self, slots, sink)
        except BaseException:
            model.close()
            raise
        if options.embeddings:
            try:
                self._embedder = Embedder(self)
            except BaseException:
                self.engine.close()
                model.close()
                raise
        self.slots = self.engine.slots
        self._closed = False

    @property
    def n_layers(self) -> int:
        """Transformer blocks (what ``n_gpu_layers`` counts)."""
        import llama_cpp

        return int(llama_cpp.llama_model_n_layer(self._model.model))

    @property
    def head_dim(self) -> int:
        import llama_cpp

        m = self._model.model
        return int(llama_cpp.llama_model_n_embd(m) // max(1, llama_cpp.llama_model_n_head(m)))

    @property
    def keys_f32(self) -> bool:
        """Keys cached as f32 rather than f16: on a CPU without flash attention and with small
        heads, whose dot products are too short for llama.cpp's f16 vector loop and convert
        element by element (the shipped model: prompts 1.5x and generation 1.3-1.4x faster;
        at head size 64, slower)."""
        device = self.device
        return (
            not device.gpu_offload
            and device.flash_attn == "off"
            and self.head_dim < FLASH_ATTN_MIN_HEAD_DIM
        )

    def kv_bytes_per_token(self) -> int:
        """KV cache per token of context (every layer; f16 values, f16 or f32 keys)."""
        import llama_cpp

        m = self._model.model
        n_head = max(1, llama_cpp.llama_model_n_head(m))
        kv_dim = llama_cpp.llama_model_n_embd(m) * llama_cpp.llama_model_n_head_kv(m) // n_head
        return int(llama_cpp.llama_model_n_layer(m) * kv_dim * ((4 if self.keys_f32 else 2) + 2))

    def kv_bytes(self) -> int:
        """The KV caches' bytes: every slot's, and the prefill context's (one slot more)."""
        engine = self.engine
        slots = self.slots + (isinstance(engine, BatchEngine) and engine.prefill is not None)
        return self.info.n_ctx * slots * self.kv_bytes_per_token()

    # tokens ----------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        bos = self.info.bos_token
        templated = bool(bos) and prompt.startswith(bos or "")
        tokens: list[int] = self._model.tokenize(
            prompt.encode("utf-8"), add_bos=not templated, special=templated
        )
        return tokens

    def tokenize_text(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        tokens: list[int] = self._model.tokenize(
            text.encode("utf-8"), add_bos=add_special, special=parse_special
        )
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        import ctypes

        import llama_cpp

        self.check_tokens(tokens, "tokens")
        if not tokens:
            return ""
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = 16 * len(tokens) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            # special tokens rendered as their text, nothing removed: what was tokenised
            # (with parse_special) comes back as it was
            n = llama_cpp.llama_detokenize(self._vocab, ids, len(tokens), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n

    def token_piece(self, token: int) -> bytes:
        self.check_tokens([token], "tokens")
        piece: bytes = self._model.detokenize([token], special=True)
        return piece

    @property
    def embeddings(self) -> bool:
        return self._embedder is not None

    @property
    def n_embd(self) -> int:
        return self._embedder.n_embd if self._embedder is not None else 0

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        if self._embedder is None or self._closed:
            return super().embed(inputs)
        return self._embedder.embed(inputs)

    def piece(self, token: int) -> bytes:
        """The bytes of one token (cached: the vocabulary is fixed)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._model.detokenize([token], special=False)
            if token == self._bos:
                piece = b""
            self._pieces[token] = piece
        return piece

    def infill(self, prefix: str, suffix: str) -> list[int]:
        import llama_cpp

        vocab = self._vocab
        pre, suf, mid = (
            llama_cpp.llama_vocab_fim_pre(vocab),
            llama_cpp.llama_vocab_fim_suf(vocab),
            llama_cpp.llama_vocab_fim_mid(vocab),
        )
        if min(pre, suf, mid) < 0:
            return super().infill(prefix, suffix)
        encode = self._model.tokenize
        head = [self._bos] if self._bos >= 0 else []
        return [
            *head,
            pre,
            *encode(prefix.encode("utf-8"), add_bos=False, special=False),
            suf,
            *encode(suffix.encode("utf-8"), add_bos=False, special=False),
            mid,
        ]

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        if params.grammar:  # parse it here, on the caller's thread: the engine never fails on it
            grammar_sampler(self, params.grammar).close()

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self._vocab, token))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.close()
            if self._embedder is not None:
                self._embedder.close()
            self._model.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Grammar:
    """A grammar sampler made on its own, to check that a grammar parses."""

    def __init__(self, pointer: Any) -> None:
        self.pointer = pointer

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_free(self.pointer)


def grammar_sampler(model: LlamaCppModel, grammar: str) -> _Grammar:
    """llama.cpp's grammar sampler for ``grammar``, or InvalidInput when it does not parse."""
    import llama_cpp

    pointer = llama_cpp.llama_sampler_init_grammar(model._vocab, grammar.encode("utf-8"), b"root")
    if not pointer:
        raise InvalidInput(
            "invalid_grammar",
            "grammar: llama.cpp could not parse it (a GBNF grammar with a `root` rule)",
        )
    return _Grammar(pointer)


def token_logprobs(model: LlamaCppModel, logits: Any, token: int, top: int) -> Any:
    """``token``'s log-probability under the model's distribution at this place (a softmax of
    the raw logits, before any sampling setting), and the ``top`` most likely tokens'."""
    import numpy as np

    from haifctl import wire

    row = np.ctypeslib.as_array(logits, shape=(model.info.n_vocab,)).astype(np.float64)
    peak = row.max()
    logsum = peak + np.log(np.exp(row - peak).sum())

    def entry(t: int) -> tuple[str, float, bytes]:
        piece = model.piece(t)
        return piece.decode("utf-8", "replace"), float(row[t] - logsum), piece

    alternatives = []
    if top > 0:
        k = min(top, row.shape[0])
        best = np.argpartition(-row, k - 1)[:k]
        for t in best[np.argsort(-row[best])]:
            alternatives.append(wire.TopLogprob(*entry(int(t))))
    return wire.TokenLogprob(*entry(token), top=alternatives)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def transpose_values(state: bytes, n_stream: int) -> bytes:
    """One sequence's cache as ``llama_state_seq_get_data`` writes it from a flash-attention
    context of one KV stream, rewritten for a context without flash attention and ``n_stream``
    streams: the same cells and keys, the values transposed (one row per value dimension rather
    than per cell, as llama.cpp keeps them when it multiplies them without flash attention).
    Raises ValueError on any layout it does not know (cell extensions, quantised values, sizes
    that do not add up); the caller then feeds the prompt itself."""
    view = memoryview(state)
    at = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal at
        values = struct.unpack_from(fmt, view, at)
        at += struct.calcsize(fmt)
        return values

    try:
        _magic, _seq = take("<Ii")
        (streams,) = take("<I")
        (cells,) = take("<I")
        if streams != 1 or cells == 0:
            raise ValueError(f"{streams} streams of {cells} cells")
        out: list[bytes | memoryview] = [view[:8], struct.pack("<II", n_stream, cells)]
        # each cell: its position, one sequence id, that id (nothing else is understood)
        if at + 12 * cells > len(view):
            raise ValueError("truncated")
        meta = np.frombuffer(view[at : at + 12 * cells], dtype="<i4").reshape(cells, 3)
        if (meta[:, 1] != 1).any():
            raise ValueError("a cell of several sequences")
        out.append(view[at : at + 12 * cells])
        at += 12 * cells
        v_trans, n_layer = take("<II")
        if v_trans != 0:
            raise ValueError("values already transposed")
        out.append(struct.pack("<II", 1, n_layer))
        keys = at
        for _ in range(n_layer):
            _type, row = take("<iQ")
            at += row * cells
        out.append(view[keys:at])
        for _ in range(n_layer):
            ggml_type, row = take("<iQ")
            width = {GGML_F32: 4, GGML_F16: 2}.get(ggml_type)
            if width is None or row % width:
                raise ValueError(f"values of ggml type {ggml_type}")
            size = row * cells
            if at + size > len(view):
                raise ValueError("truncated")
            values = np.frombuffer(
                view[at : at + size], dtype=np.uint32 if width == 4 else np.uint16
            )
            at += size
            out.append(struct.pack("<iII", ggml_type, width, row // width))
            out.append(values.reshape(cells, row // width).T.tobytes())
    except struct.error as exc:
        raise ValueError(f"truncated: {exc}") from None
    if at != len(view):
        raise ValueError(f"{len(view) - at} bytes left over")
    out.append(bytes(4 * (n_stream - 1)))  # the other streams: no cells
    return b"".join(out)


class Prefill:
    """Prompts fed with flash attention, generation without: on a CPU with small heads (the
    shipped model's are 8 wide), llama.cpp's flash-attention kernel feeds a prompt 2-3x faster
    than the plain one (it skips the cells the causal mask hides, where the plain one multiplies
    a padded 256 or more) but generates 3-4x slower (bench/attention.py).  A context of its own,
    one sequence, flash attention on, takes one prompt at a time, in chunks of N_BATCH; once
    fed, the sequence's cache moves to its slot in the engine's context (transpose_values) and
    it generates there.  The first token is sampled from this context's logits."""

    def __init__(self, engine: BatchEngine) -> None:
        import llama_cpp

        model = engine.model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = engine.n_ctx_seq
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = model.device.threads_batch
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = engine.key_type  # the cache moves as it is: the same types
        params.type_v = engine.value_type
        self._ctx: Any = _internals().LlamaContext(model=model._model, params=params, verbose=False)
        self._batch = batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        # One sequence, id 0, for every token, set once; the tokens, positions and the flag of
        # the token whose logits are wanted are written through numpy views of the batch's
        # arrays (a loop over ctypes items cost 66 us for a 120-token prompt, these 4)
        for j in range(N_BATCH):
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
        self._tokens = np.ctypeslib.as_array(batch.token, shape=(N_BATCH,))
        self._positions = np.ctypeslib.as_array(batch.pos, shape=(N_BATCH,))
        self._wanted = np.ctypeslib.as_array(batch.logits, shape=(N_BATCH,))
        self._llama_cpp = llama_cpp
        self._n_stream = engine.slots
        self._threads = model.device.threads_batch
        # the sequence whose cache this context holds: being fed, or fed and its first token
        # sampled, to move to its slot at the start of the next step (off that token's way)
        self.seq: _Seq | None = None

    @property
    def ctx(self) -> Any:
        return self._ctx.ctx

    def feed(self, seq: _Seq, threads: int) -> int:
        """Feed ``seq``'s next chunk of prompt on ``threads`` threads; the batch index of its
        last token's logits once the whole prompt is in, else -1."""
        llama_cpp = self._llama_cpp
        if threads != self._threads:
            llama_cpp.llama_set_n_threads(self._ctx.ctx, threads, threads)
            self._threads = threads
        if self.seq is not seq:
            self._ctx.kv_cache_seq_rm(0, -1, -1)
            self.seq = seq
        prompt = seq.job.prompt
        batch = self._batch
        chunk = prompt[seq.fed : seq.fed + N_BATCH]
        n = len(chunk)
        end = seq.fed + n == len(prompt)
        self._tokens[:n] = chunk
        self._positions[:n] = np.arange(seq.fed, seq.fed + n)
        self._wanted[:n] = 0
        self._wanted[n - 1] = end
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if rc != 0:
            raise HaifError("decode_failed", f"llama_decode returned {rc} feeding a prompt")
        seq.fed += len(chunk)
        return len(chunk) - 1 if end else -1

    def hand_over(self, seq: _Seq, target: Any) -> bool:
        """Move the fed sequence's cache to its slot in ``target`` (the engine's context).
        False if llama.cpp's state layout is not the one transpose_values knows."""
        llama_cpp = self._llama_cpp
        self.seq = None
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buffer, size, 0)
        self._ctx.kv_cache_seq_rm(0, -1, -1)
        try:
            state = transpose_values(
                memoryview(buffer)[:written].cast("B").tobytes(), self._n_stream
            )
        except ValueError:
            return False
        source = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return bool(llama_cpp.llama_state_seq_set_data(target, source, len(state), seq.slot))

    def drop(self, seq: _Seq) -> None:
        """``seq`` ended (cancelled, failed, or done at its first token) while its cache was
        here."""
        if self.seq is seq:
            self.seq = None
            self._ctx.kv_cache_seq_rm(0, -1, -1)

    def close(self) -> None:
        self._llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()


class _Seq:
    """A job's state while it holds a slot."""

    __slots__ = (
        "emitter",
        "fed",
        "job",
        "kv",
        "last",
        "n_past",
        "reported",
        "reused",
        "sampler",
        "slot",
    )

    def __init__(
        self, job: Job, slot: int, sampler: Any, emitter: Emitter, reused: list[int]
    ) -> None:
        self.job = job
        self.slot = slot
        self.sampler = sampler
        self.emitter = emitter
        self.kv = reused  # the tokens in this slot's KV cache, by position
        self.fed = len(reused)  # prompt tokens already in the KV cache
        self.reused = len(reused)  # of which this many were there when it came
        self.n_past = 0
        self.last = -1  # the token to feed next (the one just sampled)
        self.reported = 0  # tokens already handed out in events


class BatchEngine(Engine):
    """Continuous batching on one llama.cpp context: a sequence id per slot, a KV stream per
    sequence (attention never scans the other slots' cells), a sampler chain per sequence; and,
    where the model's device facts say so, a :class:`Prefill` context that feeds the prompts."""

    def __init__(self, model: LlamaCppModel, slots: int, sink: Sink | None) -> None:
        import llama_cpp

        super().__init__(sink)
        self.model = model
        self.slots = slots
        self.n_ctx_seq = model.info.n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx_seq * slots
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = slots
        # llama.cpp takes n_threads_batch for every step of more than one token, generating
        # ones included: step() sets both, by what the step holds
        self._threads = (model.device.threads, model.device.threads_batch)
        self._threads_now = model.device.threads
        params.n_threads = params.n_threads_batch = self._threads_now
        params.kv_unified = False  # one KV stream per sequence, as llama-server does
        params.flash_attn_type = {
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        }[model.device.flash_attn]
        self.key_type = GGML_F32 if model.keys_f32 else GGML_F16
        self.value_type = GGML_F16
        params.type_k, params.type_v = self.key_type, self.value_type
        try:
            self._ctx: Any = _internals().LlamaContext(
                model=model._model, params=params, verbose=False
            )
            self.prefill = Prefill(self) if model.device.flash_prefill else None
        except (ValueError, RuntimeError) as exc:
            if hasattr(self, "_ctx"):
                self._ctx.close()
            raise HaifError(
                "model_load_failed",
                f"cannot create a {slots}-slot context of {self.n_ctx_seq} tokens each: {exc}",
                "lower --slots or --n-ctx",
            ) from None
        self._llama_cpp = llama_cpp
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._free = list(range(slots - 1, -1, -1))
        # each slot's cached tokens, kept after its sequence ends: a prompt that starts as one of
        # them (a chat's next turn, a shared system prompt) is fed from where they differ
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        self._running: list[_Seq] = []
        self._generated_at = 0.0  # time.monotonic() of the last step that ran them
        # CPUs to pin this engine's threads to, one each (empty: none are pinned)
        self._cpus = cpus_to_pin(max(self._threads))
        self._team = 1  # threads of ours pinned so far: this one, then llama.cpp's
        self.start_thread("llama-engine")  # last: everything it touches exists

    def _tasks(self, threads: int) -> set[str] | None:
        """The process's threads before a decode on ``threads`` threads that may start more of
        llama.cpp's (None when there is nothing to pin)."""
        if threads <= self._team or not self._cpus:
            return None
        return set(os.listdir("/proc/self/task"))

    def _pin_new(self, before: set[str], threads: int) -> None:
        """Pin the threads llama.cpp started in the decode just run, one CPU each, and this
        one first (threads it starts inherit its CPU, and are moved right after)."""
        import threading

        if self._team == 1:
            os.sched_setaffinity(threading.get_native_id(), {self._cpus[0]})
        new = sorted(set(os.listdir("/proc/self/task")) - before, key=int)
        for tid in new[: len(self._cpus) - self._team]:
            with contextlib.suppress(OSError):  # (gone already)
                os.sched_setaffinity(int(tid), {self._cpus[self._team]})
            self._team += 1
        self._team = max(self._team, min(threads, len(self._cpus)))

    def busy(self) -> bool:
        return bool(self._running)

    def _admit(self, job: Job) -> _Seq:
        p = job.params
        llama_cpp = self._llama_cpp
        sampler = _internals().LlamaSampler()
        if p.logit_bias:
            sampler.add_logit_bias(self.model.info.n_vocab, p.logit_bias)
        sampler.add_penalties(
            n_vocab=self.model.info.n_vocab,
            penalty_last_n=PENALTY_LAST_N,
            penalty_repeat=p.repeat_penalty,
            penalty_freq=p.frequency_penalty,
            penalty_present=p.presence_penalty,
        )
        if p.grammar:  # checked when the job was made (check_params): it parses
            grammar = llama_cpp.llama_sampler_init_grammar(
                self.model._vocab, p.grammar.encode("utf-8"), b"root"
            )
            llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
        if p.temperature == 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(p.top_k)
            sampler.add_top_p(p.top_p, 1)
            sampler.add_min_p(p.min_p, 1)
            sampler.add_temp(p.temperature)
            sampler.add_dist(p.seed if p.seed is not None else random.getrandbits(31))
        emitter = Emitter(p, job.budget, self.model.is_eog, self.model.piece)
        slot, reused = self._take_slot(job.prompt)
        return _Seq(job, slot, sampler, emitter, reused)

    def _take_slot(self, prompt: list[int]) -> tuple[int, list[int]]:
        """The free slot whose cache shares the longest prefix with ``prompt`` (among none, the
        one free the longest), and the cached tokens kept: at most all of the prompt but its
        last token, whose logits the first sample needs."""
        best, best_n = self._free[0], -1
        for slot in self._free:
            n = common_prefix(self._cached[slot], prompt)
            if n > best_n:
                best, best_n = slot, n
        self._free.remove(best)
        keep = min(best_n, len(prompt) - 1)
        # a model whose memory cannot drop a tail (a recurrent one) starts from nothing
        if keep <= 0 or not self._ctx.kv_cache_seq_rm(best, keep, -1):
            self._ctx.kv_cache_seq_rm(best, -1, -1)
            keep = 0
        self._cached[best] = []
        return best, prompt[:keep]

    def _hand_over(self, prefill: Prefill, seq: _Seq) -> Prefill | None:
        """Move ``seq``'s cache from the prefill context to its slot.  With a llama.cpp whose
        layout transpose_values does not know, the slot feeds the prompt again (its first
        token, already out, is kept) and the engine stops using the prefill context."""
        if prefill.hand_over(seq, self._ctx.ctx):
            seq.kv.extend(seq.job.prompt)
            return prefill
        self._ctx.kv_cache_seq_rm(seq.slot, -1, -1)
        seq.kv.clear()
        seq.fed = 0
        self.prefill = None
        prefill.close()
        return None

    @staticmethod
    def _to_prefill(seq: _Seq) -> bool:
        """A sequence whose prompt the prefill context should feed: not started here, and with
        at least PREFILL_MIN_TOKENS to feed beyond a reused prefix of at most half of it (the
        prefill context has no cache to reuse: it feeds that prefix again, at about a third of
        the cost here)."""
        n = len(seq.job.prompt)
        return (
            seq.last < 0
            and seq.fed == seq.reused
            and n - seq.fed >= PREFILL_MIN_TOKENS
            and 2 * seq.reused <= n
        )

    def _release(self, seq: _Seq, keep: bool = True) -> None:
        """Free the slot; its cache stays for the next prompt that starts the same, unless the
        step that was filling it failed (``keep`` False)."""
        if self.prefill is not None:
            self.prefill.drop(seq)
        if keep:
            self._cached[seq.slot] = seq.kv
        else:
            self._ctx.kv_cache_seq_rm(seq.slot, -1, -1)
        self._free.append(seq.slot)
        seq.sampler.close()

    def _finish(
        self, seq: _Seq, reason: str, text: str, step: Step, logprobs: list[Any] | None = None
    ) -> None:
        self._running.remove(seq)
        self._release(seq)
        step.append(
            (
                seq.job,
                TokenEvent(
                    text=text,
                    n_tokens=seq.emitter.produced - seq.reported,
                    finish_reason=reason,
                    prompt_tokens=len(seq.job.prompt),
                    completion_tokens=seq.emitter.produced,
                    logprobs=logprobs,
                ),
            )
        )

    def step(self, waiting: list[Job]) -> Step:
        llama_cpp = self._llama_cpp
        out: Step = []
        for seq in list(self._running):
            if seq.job.cancel.cancelled:
                self._finish(seq, "cancelled", "", out)
        while waiting and self._free:
            job = waiting.pop(0)
            if job.cancel.cancelled:
                out.append((job, TokenEvent(text="", finish_reason="cancelled")))
            elif job.budget <= 0:
                out.append(
                    (
                        job,
                        TokenEvent(text="", finish_reason="length", prompt_tokens=len(job.prompt)),
                    )
                )
            else:
                self._running.append(self._admit(job))
        if not self._running:
            return out
        batch = self._batch
        token, pos, n_seq, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        prefill = self.prefill
        if prefill is not None and prefill.seq is not None and prefill.seq.last >= 0:
            prefill = self._hand_over(prefill, prefill.seq)
        fed = None  # the sequence the prefill context feeds in this step
        if prefill is not None:
            fed = prefill.seq
            if fed is None:
                fed = next((s for s in self._running if self._to_prefill(s)), None)
                if fed is not None and fed.fed:  # a short prefix reused: fed again, with the rest
                    self._ctx.kv_cache_seq_rm(fed.slot, -1, -1)
                    fed.kv.clear()
                    fed.fed = fed.reused = 0
        n = 0
        outputs: list[tuple[_Seq, int]] = []
        now = time.monotonic()
        if fed is None or now - self._generated_at >= GENERATION_HOLD_S:
            for seq in self._running:  # one token for every sequence that is generating
                if seq.last >= 0 and n < N_BATCH and seq.fed == len(seq.job.prompt):
                    token[n], pos[n], n_seq[n], logits[n] = seq.last, seq.n_past, 1, True
                    seq_id[n][0] = seq.slot
                    seq.kv.append(seq.last)
                    outputs.append((seq, n))
                    n += 1
            self._generated_at = now
        generating = n
        for seq in self._running:  # then prompts, in the order they came, as room allows
            if n - generating >= PROMPT_TOKENS_PER_STEP or fed is not None:
                break  # (a step that feeds the prefill context holds a prompt already)
            prompt = seq.job.prompt
            while seq.fed < len(prompt) and n < N_BATCH:
                # (a prompt fed again after a failed hand-over has its first token already)
                last = seq.fed == len(prompt) - 1 and seq.last < 0
                token[n], pos[n], n_seq[n], logits[n] = prompt[seq.fed], seq.fed, 1, last
                seq_id[n][0] = seq.slot
                seq.kv.append(prompt[seq.fed])
                if last:
                    outputs.append((seq, n))
                seq.fed += 1
                n += 1
        batch.n_tokens = n
        ctx = self._ctx.ctx
        if n:
            threads = self._threads[n - generating >= THREADS_BATCH_MIN_TOKENS]
            if threads != self._threads_now:
                llama_cpp.llama_set_n_threads(ctx, threads, threads)
                self._threads_now = threads
            before = self._tasks(threads)
            rc = llama_cpp.llama_decode(ctx, batch)
            if before is not None:
                self._pin_new(before, threads)
            if rc != 0:
                raise HaifError("decode_failed", f"llama_decode returned {rc}")
        contexts = [ctx] * len(outputs)
        if fed is not None:
            assert prefill is not None
            # threads_batch threads while nothing else runs; once sequences generate, their
            # text crosses the relays, which a prompt on every core would hold up
            threads = self._threads[not any(s.last >= 0 for s in self._running)]
            before = self._tasks(threads)
            index = prefill.feed(fed, threads)
            if before is not None:
                self._pin_new(before, threads)
            if index >= 0:  # its first token comes from here; the cache moves next step
                outputs.append((fed, index))
                contexts.append(prefill.ctx)
        sample = llama_cpp.llama_sampler_sample
        limit = self.n_ctx_seq - 1
        for (seq, index), ctx in zip(outputs, contexts, strict=True):
            seq.n_past = len(seq.job.prompt) if seq.last < 0 else seq.n_past + 1
            sampled = sample(seq.sampler.sampler, ctx, index)
            produced = seq.emitter.produced
            text, done = seq.emitter.token(sampled, seq.n_past < limit)
            logprobs = None
            if seq.job.params.logprobs >= 0 and seq.emitter.produced > produced:
                logits = llama_cpp.llama_get_logits_ith(ctx, index)
                logprobs = [token_logprobs(self.model, logits, sampled, seq.job.params.logprobs)]
            if done is not None:
                self._finish(seq, done, text, out, logprobs)
                continue
            seq.last = sampled
            seq.reported += 1
            out.append((seq.job, TokenEvent(text=text, n_tokens=1, logprobs=logprobs)))
        return out

    def abort(self) -> list[Job]:
        jobs = [seq.job for seq in self._running]
        for seq in self._running:
            self._release(seq, keep=False)
        self._running.clear()
        return jobs

    def free(self) -> None:
        self.abort()
        if self.prefill is not None:
            self.prefill.close()
            self.prefill = None
        self._llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()


class Embedder:
    """A context of its own for embeddings: pooled (the model's pooling, or the mean of its
    tokens' states for a model that has none, such as a generative one), one input at a time.
    A lock keeps it to one thread at a time; the engine's context is never touched."""

    def __init__(self, model: LlamaCppModel) -> None:
        import threading

        import llama_cpp

        self.model = model
        self.n_ctx = model.info.n_ctx
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model._model.model))
        self._lock = threading.Lock()
        self._llama_cpp = llama_cpp
        meta = model._model.metadata()
        pooling = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
        if pooling == str(llama_cpp.LLAMA_POOLING_TYPE_RANK):
            raise HaifError(
                "model_load_failed",
                f"{model.info.path} is a reranker: its output is a score, not an embedding",
                "start this worker without --embeddings",
            )
        if pooling in (None, str(llama_cpp.LLAMA_POOLING_TYPE_NONE)):
            self._ctx = self._context(llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        else:
            self._ctx = self._context(llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)

    def _context(self, pooling: int) -> Any:
        llama_cpp = self._llama_cpp
        params = llama_cpp.llama_context_default_params()
        # one input per decode, whole (a non-causal model must see all of it in one ubatch)
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.model.device.threads_batch
        params.embeddings = True
        params.pooling_type = pooling
        if not self.model.device.gpu_offload:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        try:
            return _internals().LlamaContext(model=self.model._model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise HaifError(
                "model_load_failed",
                f"cannot create an embedding context of {self.n_ctx} tokens: {exc}",
                "lower --n-ctx, or start this worker without --embeddings",
            ) from None

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        import numpy as np

        model = self.model
        prompts: list[list[int]] = []
        for i, item in enumerate(inputs):  # every input checked before any is decoded
            if isinstance(item, str):
                tokens = model.tokenize_text(item, add_special=True, parse_special=False)
            else:
                tokens = list(item)
                model.check_tokens(tokens, f"input[{i}]")
            if not tokens:
                raise InvalidInput("invalid_request", f"input[{i}]: no tokens to embed")
            if len(tokens) > self.n_ctx:
                raise InvalidInput(
                    "input_too_long",
                    f"input[{i}] is {len(tokens)} tokens; the context window holds {self.n_ctx}",
                    "shorten it or raise --n-ctx (up to the model's trained context)",
                )
            prompts.append(tokens)
        llama_cpp = self._llama_cpp
        vectors: list[list[float]] = []
        with self._lock:
            if self._ctx is None:
                raise HaifError("model_closed", "the model has been unloaded")
            ctx = self._ctx.ctx
            batch = self._batch
            for tokens in prompts:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                for i, token in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True
                batch.n_tokens = len(tokens)
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    raise HaifError("decode_failed", f"llama_decode returned {rc}")
                pointer = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                if not pointer:
                    raise HaifError("embedding_failed", "llama.cpp returned no embedding")
                row = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(row))
                vectors.append((row / norm if norm > 0 else row).tolist())
        return vectors, sum(len(tokens) for tokens in prompts)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._llama_cpp.llama_batch_free(self._batch)
                self._ctx.close()
                self._ctx = None


class LlamaCppRuntime:
    name = "llama.cpp"

    def load(self, path: Path, options: LoadOptions, sink: Sink | None = None) -> LlamaCppModel:
        return LlamaCppModel(path, options, sink)
