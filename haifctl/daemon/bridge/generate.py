"""The routes that generate: ``/infer``, ``/v1/completions`` and ``/v1/chat/completions``.

Each turns its body into one request per sequence (``n`` choices, several prompts), runs them
through the gateway at once, and hands what comes back to its renderer: a whole answer, or SSE
events as the text arrives.  An error before the first text is an HTTP status; one after it
ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from haifctl import wire
from haifctl.daemon.bridge.bodies import ChatBody, CompletionBody, InferBody
from haifctl.daemon.bridge.errors import public_message, unsupported
from haifctl.daemon.bridge.render import (
    ChatRenderer,
    Choice,
    InferRenderer,
    Renderer,
    TextRenderer,
    sse,
)
from haifctl.daemon.bridge.state import client_key, state
from haifctl.errors import HaifError

router = APIRouter()

Stream = AsyncIterator[wire.Msg]


class EventStream(Response):
    """A streamed answer (SSE, or JSON lines for ``/infer``), sent from the request's own task.

    Starlette's StreamingResponse sends from a task group of two new tasks, one streaming and
    one listening for the client to leave: 40-70 us of the bridge's CPU a request and a turn of
    the event loop between the first text's arrival and its write.  Here the request's task
    streams and one watcher task listens; when the client leaves mid-stream the watcher
    cancels the streaming, and however the response ends its events are closed, so that the
    generation on the worker is cancelled at once (not when GC gets to it)."""

    def __init__(self, events: AsyncGenerator[bytes], media_type: str) -> None:
        self.events = events
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        streaming = True
        left = False  # the client hung up while its text was streaming

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            if streaming:
                left = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            headers = self.raw_headers
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": headers}
            )
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            streaming = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()  # our own cancellation: the response is over, nothing failed
        finally:
            streaming = False
            watcher.cancel()
            await self.events.aclose()


async def _aclose(stream: Stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def open_streams(
    request: Request, requests: list[dict[str, Any]], key: str
) -> list[tuple[wire.Msg, Stream]]:
    """Start every sequence and wait for each one's first message: an error there (an unknown
    model, a full queue) becomes the response's status, and the other sequences are cancelled."""
    bridge = state(request)
    tp = getattr(request.state, "traceparent", "")
    streams = [bridge.link.stream(fields, key, tp).__aiter__() for fields in requests]
    if len(streams) == 1:
        try:
            return [(await anext(streams[0]), streams[0])]
        except BaseException:
            await _aclose(streams[0])
            raise
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        await asyncio.gather(*firsts)
    except BaseException:
        # the first failure is the answer; the other sequences stop waiting (each one's wait is
        # cancelled before its stream is closed: a stream cannot close while it waits)
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for stream in streams:
            await _aclose(stream)
        raise
    return [(first.result(), stream) for first, stream in zip(firsts, streams, strict=True)]


async def merged(
    opened: list[tuple[wire.Msg, Stream]],
) -> AsyncGenerator[tuple[int, wire.Msg]]:
    """Every sequence's messages as they come, tagged with the sequence's index."""
    if len(opened) == 1:  # no task for the common case
        first, rest = opened[0]
        yield 0, first
        if not isinstance(first, wire.Done):
            async for msg in rest:
                yield 0, msg
        return
    queue: asyncio.Queue[tuple[int, wire.Msg | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, first: wire.Msg, rest: Stream) -> None:
        try:
            await queue.put((index, first))
            if not isinstance(first, wire.Done):
                async for msg in rest:
                    await queue.put((index, msg))
            await queue.put((index, None))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, f, r)) for i, (f, r) in enumerate(opened)]
    left = len(tasks)
    try:
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for _, rest in opened:
            await _aclose(rest)


def take(choice: Choice, msg: wire.Msg) -> wire.Chunk | None:
    """Account for one message in its choice; the chunk, if it is text."""
    if isinstance(msg, wire.Chunk):
        choice.parts.append(msg.text)
        if msg.logprobs:
            choice.logprobs.extend(msg.logprobs)
        return msg
    if isinstance(msg, wire.Done):
        choice.done = msg
    return None


async def respond(
    request: Request,
    renderer: Renderer,
    requests: list[dict[str, Any]],
    key: str,
    *,
    stream: bool,
    prefixes: list[str] | None = None,
) -> Response:
    choices = [Choice(i, prefixes[i] if prefixes else "") for i in range(len(requests))]
    opened = await open_streams(request, requests, key)
    if not stream:
        async for index, msg in merged(opened):
            take(choices[index], msg)
        return JSONResponse(renderer.body(choices))

    async def events() -> AsyncGenerator[bytes]:
        messages = merged(opened)
        try:
            opening = renderer.opening(choices)
            if opening:
                yield opening
            async for index, msg in messages:
                choice = choices[index]
                chunk = take(choice, msg)
                if chunk is not None:
                    out = renderer.piece(choice, chunk)
                    if out:
                        yield out
                elif choice.done is not None:
                    yield renderer.closing(choice)
            ending = renderer.ending(choices)
            if ending:
                yield ending
        except HaifError as exc:
            # a stream cut after the headers went ends with an error event, not a hang
            yield sse({"error": {"message": public_message(exc), "code": exc.code}})
        finally:
            await messages.aclose()

    return EventStream(events(), renderer.media_type)


def choices_of(base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``n`` sequences of one request: with a seed, sequence i samples with seed + i, so the
    choices differ and the answer is reproducible."""
    if n == 1:
        return [base]
    out = []
    for i in range(n):
        fields = dict(base)
        if "seed" in fields:
            fields["seed"] = (fields["seed"] + i) % 2**31
        out.append(fields)
    return out


@router.post("/infer", tags=["haifctl"])
async def infer(body: InferBody, request: Request, key: str = Depends(client_key)) -> Response:
    """Run one request: a prompt or chat messages; SSE token events with "stream": true."""
    fields = body.fields()
    renderer = InferRenderer(body.model or "", logprobs=False)
    return await respond(request, renderer, [fields], key, stream=body.stream)


@router.post("/v1/completions", tags=["openai"])
async def completions(
    body: CompletionBody, request: Request, key: str = Depends(client_key)
) -> Response:
    """OpenAI text completions: one prompt, several, or token ids; ``n`` choices each."""
    base = body.fields()
    requests: list[dict[str, Any]] = []
    prefixes: list[str] = []
    for prompt in body.prompts():
        if body.echo and "prompt_ids" in prompt:
            raise unsupported("echo", "echo needs text prompts, not token ids")
        for fields in choices_of({**base, **prompt}, body.n):
            requests.append(fields)
            prefixes.append(prompt.get("prompt", "") if body.echo else "")
    if body.echo and body.logprobs is not None:
        raise unsupported("echo", "echo with logprobs (the prompt's logprobs) is not supported")
    renderer = TextRenderer(
        body.model or "", body.include_usage, logprobs=body.logprobs is not None
    )
    return await respond(request, renderer, requests, key, stream=body.stream, prefixes=prefixes)


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(
    body: ChatBody, request: Request, key: str = Depends(client_key)
) -> Response:
    """OpenAI chat completions; messages use the model's chat template, tools and structured
    output constrain what the model may write."""
    fields = body.fields()
    choice = body.tool_choice_value()
    tools = fields.get("tools") if choice != "none" else None
    renderer = ChatRenderer(
        body.model or "",
        body.include_usage,
        logprobs=bool(body.logprobs),
        tools=tools,
        forced=choice != "auto",
    )
    if user := body.user:
        span = getattr(request.state, "span", None)
        if span is not None:
            span.set_attribute("enduser.id", user)
    return await respond(request, renderer, choices_of(fields, body.n), key, stream=body.stream)
