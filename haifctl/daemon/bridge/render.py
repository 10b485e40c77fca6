"""The three answers the bridge gives: ``/infer``'s, OpenAI text completions' and OpenAI chat
completions'.  Each renderer turns the same messages from the gateway (a sequence's text, its
logprobs, its end) into one response body or into SSE events, so the streamed and
non-streamed paths share one place per shape.  A request may run several sequences (``n``,
several prompts); each is a *choice* with its index.
"""

from __future__ import annotations

import base64
import json
import time
from abc import ABC, abstractmethod
from typing import Any

from haifctl import __version__, wire
from haifctl.grammar import parse_tool_call

FINGERPRINT = f"haifctl-{__version__}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {dumps(obj)}\n\n".encode()


class Choice:
    """One sequence's answer as it arrives."""

    __slots__ = ("done", "held", "index", "logprobs", "parts", "prefix")

    def __init__(self, index: int, prefix: str = "") -> None:
        self.index = index
        self.prefix = prefix  # echoed prompt text
        self.parts: list[str] = []
        self.logprobs: list[wire.TokenLogprob] = []
        self.done: wire.Done | None = None
        self.held = ""  # streamed text kept back while it may still be a tool call

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.parts)


def usage(dones: list[wire.Done]) -> dict[str, int]:
    prompt = sum(d.prompt_tokens for d in dones)
    completion = sum(d.completion_tokens for d in dones)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class Renderer(ABC):
    """What a route says: ``body`` for a whole answer; ``opening``, ``piece``, ``closing`` and
    ``ending`` for a stream."""

    media_type = "text/event-stream"

    def __init__(self, model: str) -> None:
        self.model = model
        self.created = int(time.time())

    @abstractmethod
    def body(self, choices: list[Choice]) -> dict[str, Any]: ...

    def opening(self, choices: list[Choice]) -> bytes:
        return b""

    @abstractmethod
    def piece(self, choice: Choice, chunk: wire.Chunk) -> bytes: ...

    @abstractmethod
    def closing(self, choice: Choice) -> bytes: ...

    def ending(self, choices: list[Choice]) -> bytes:
        return b""


class InferRenderer(Renderer):
    """``/infer``: one sequence; token events and a done event carrying the whole answer."""

    def __init__(self, model: str, logprobs: bool) -> None:
        super().__init__(model)
        self.id = "inf-" + wire.new_id()[:24]
        self.with_logprobs = logprobs

    def body(self, choices: list[Choice]) -> dict[str, Any]:
        choice = choices[0]
        done = choice.done
        assert done is not None
        out: dict[str, Any] = {
            "id": self.id,
            "model": done.model,
            "output": choice.text,
            "usage": usage([done]),
            "finish_reason": done.finish_reason,
            "worker": done.worker,
            "timings": {
                "time_to_first_token_ms": done.time_to_first_token_ms,
                "generation_ms": done.generation_ms,
                "queue_ms": done.queue_ms,
            },
        }
        if self.with_logprobs:
            out["logprobs"] = chat_logprobs(choice.logprobs)["content"]
        return out

    def piece(self, choice: Choice, chunk: wire.Chunk) -> bytes:
        event: dict[str, Any] = {"text": chunk.text, "tokens": chunk.n_tokens}
        if self.with_logprobs:
            event["logprobs"] = chat_logprobs(chunk.logprobs)["content"]
        return sse(event, "token")

    def closing(self, choice: Choice) -> bytes:
        return sse(self.body([choice]), "done")


class OpenAIRenderer(Renderer):
    """What text and chat completions share: ids, chunks, the usage chunk, ``[DONE]``."""

    object_name = ""
    chunk_name = ""
    prefix = ""

    def __init__(self, model: str, include_usage: bool, logprobs: bool) -> None:
        super().__init__(model)
        self.id = self.prefix + wire.new_id()[:24]
        self.include_usage = include_usage
        self.with_logprobs = logprobs
        self._templates: dict[int, tuple[bytes, bytes]] = {}

    def envelope(self, choices: list[dict[str, Any]], model: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.chunk_name,
            "created": self.created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }

    def chunk(self, choice: dict[str, Any]) -> bytes:
        out = self.envelope([choice], self.model)
        if self.include_usage:
            out["usage"] = None
        return b"data: " + dumps(out).encode() + b"\n\n"

    def text_chunk(self, index: int, text: str) -> bytes:
        """The chunk of a stream's text without logprobs, the one sent for nearly every frame:
        the same JSON as :meth:`chunk` makes, from bytes made once per response (``text_field``
        names where the text goes), so a frame costs one string encode."""
        template = self._templates.get(index)
        if template is None:
            marker = "\x00text\x00"
            choice = {"index": index, **self.text_field(marker), "finish_reason": None}
            choice["logprobs"] = None
            # the text is the last value a client wrote into the chunk (a model name holding
            # the marker comes before it)
            head, _, tail = self.chunk(choice).rpartition(dumps(marker).encode())
            template = self._templates[index] = (head, tail)
        return template[0] + dumps(text).encode() + template[1]

    def text_field(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def ending(self, choices: list[Choice]) -> bytes:
        tail = b""
        if self.include_usage:
            dones = [c.done for c in choices if c.done is not None]
            last = self.envelope([], self.model or (dones[0].model if dones else ""))
            last["usage"] = usage(dones)
            tail = b"data: " + dumps(last).encode() + b"\n\n"
        return tail + b"data: [DONE]\n\n"

    def whole(self, choices: list[dict[str, Any]], dones: list[wire.Done]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            # the name the client asked for, as every chunk of a stream says (a stream's chunks
            # go out before the worker names the version it ran); the resolved one without
            "model": self.model or (dones[0].model if dones else ""),
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": usage(dones),
        }


class TextRenderer(OpenAIRenderer):
    object_name = chunk_name = "text_completion"
    prefix = "cmpl-"

    def body(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for choice in choices:
            assert choice.done is not None
            out.append(
                {
                    "index": choice.index,
                    "text": choice.text,
                    "finish_reason": finish_reason(choice.done.finish_reason),
                    "logprobs": self.logprobs(choice.logprobs, len(choice.prefix)),
                }
            )
        return self.whole(out, [c.done for c in choices if c.done is not None])

    def logprobs(self, entries: list[wire.TokenLogprob], offset: int = 0) -> Any:
        if not self.with_logprobs:
            return None
        return text_logprobs(entries, offset)

    def opening(self, choices: list[Choice]) -> bytes:
        # an echoed prompt is the first text of its choice
        return b"".join(
            self.chunk(
                {"index": c.index, "text": c.prefix, "finish_reason": None, "logprobs": None}
            )
            for c in choices
            if c.prefix
        )

    def text_field(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def piece(self, choice: Choice, chunk: wire.Chunk) -> bytes:
        if not self.with_logprobs:
            return self.text_chunk(choice.index, chunk.text)
        return self.chunk(
            {
                "index": choice.index,
                "text": chunk.text,
                "finish_reason": None,
                "logprobs": self.logprobs(chunk.logprobs),
            }
        )

    def closing(self, choice: Choice) -> bytes:
        assert choice.done is not None
        return self.chunk(
            {
                "index": choice.index,
                "text": "",
                "finish_reason": finish_reason(choice.done.finish_reason),
                "logprobs": None,
            }
        )


class ChatRenderer(OpenAIRenderer):
    """Chat completions; with ``tools``, a sequence that is a tool call becomes ``tool_calls``
    (a forced call is kept back whole; under ``auto`` text is kept back only while it can
    still turn out to be a call)."""

    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def __init__(
        self,
        model: str,
        include_usage: bool,
        logprobs: bool,
        tools: list[dict[str, Any]] | None = None,
        forced: bool = False,
    ) -> None:
        super().__init__(model, include_usage, logprobs)
        self.tools = tools or []
        self.forced = forced

    def call_of(self, choice: Choice) -> dict[str, Any] | None:
        if not self.tools:
            return None
        call = parse_tool_call(choice.text, self.tools)
        if call is None:
            return None
        name, arguments = call
        return {
            "id": f"call_{wire.new_id()[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    def reason(self, choice: Choice, call: dict[str, Any] | None) -> str:
        assert choice.done is not None
        if call is not None:
            return "tool_calls"
        return finish_reason(choice.done.finish_reason)

    def logprobs(self, entries: list[wire.TokenLogprob]) -> Any:
        return chat_logprobs(entries) if self.with_logprobs else None

    def body(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for choice in choices:
            call = self.call_of(choice)
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
            out.append(
                {
                    "index": choice.index,
                    "message": message,
                    "finish_reason": self.reason(choice, call),
                    "logprobs": self.logprobs(choice.logprobs),
                }
            )
        return self.whole(out, [c.done for c in choices if c.done is not None])

    def delta(self, choice: Choice, delta: dict[str, Any], logprobs: Any = None) -> bytes:
        return self.chunk(
            {"index": choice.index, "delta": delta, "finish_reason": None, "logprobs": logprobs}
        )

    def opening(self, choices: list[Choice]) -> bytes:
        return b"".join(self.delta(c, {"role": "assistant", "content": ""}) for c in choices)

    def may_be_call(self, text: str) -> bool:
        if not self.tools:
            return False
        if self.forced:
            return True
        head = text.lstrip()
        return not head or head.startswith("{") or "<tool_call>".startswith(head[:11])

    def piece(self, choice: Choice, chunk: wire.Chunk) -> bytes:
        if choice.held or self.may_be_call(choice.text):
            if self.may_be_call(choice.text):
                choice.held += chunk.text
                return b""
            chunk = wire.Chunk(text=choice.held + chunk.text, n_tokens=chunk.n_tokens)
            choice.held = ""
        if not self.with_logprobs:
            return self.text_chunk(choice.index, chunk.text)
        return self.delta(choice, {"content": chunk.text}, self.logprobs(chunk.logprobs))

    def text_field(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}}

    def closing(self, choice: Choice) -> bytes:
        call = self.call_of(choice) if choice.held or self.forced else None
        out = b""
        if call is not None:
            delta = {"tool_calls": [{"index": 0, **call}]}
            out = self.delta(choice, delta)
        elif choice.held:
            out = self.delta(choice, {"content": choice.held})
        choice.held = ""
        return out + self.chunk(
            {
                "index": choice.index,
                "delta": {},
                "finish_reason": self.reason(choice, call),
                "logprobs": None,
            }
        )


def _top(entry: wire.TokenLogprob) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in entry.top]


def chat_logprobs(entries: list[wire.TokenLogprob]) -> dict[str, Any]:
    """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.raw),
                "top_logprobs": _top(e),
            }
            for e in entries
        ]
    }


def text_logprobs(entries: list[wire.TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Text completions' shape: parallel lists, with each token's offset in the text."""
    offsets = []
    at = offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def embedding_value(vector: list[float], encoding: str) -> Any:
    if encoding == "base64":
        import array

        return base64.b64encode(array.array("f", vector).tobytes()).decode("ascii")
    return vector
