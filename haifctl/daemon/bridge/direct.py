"""The generating routes served straight from the edge.

``/infer``, ``/v1/completions`` and ``/v1/chat/completions`` are FastAPI routes (that is where
the OpenAPI document and ``/docs`` get them from), but a request to one of them does not walk
Starlette's router and FastAPI's middleware and dependency layers: the edge has already checked
its key and limits, so it reads the body, validates it with the same pydantic model, and calls
the same endpoint function.  Every error takes the shape the exception handlers give it.  This
is the per-request cost that sits in every request's time to first token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from haifctl.daemon.base import log
from haifctl.daemon.bridge import bodies, generate
from haifctl.daemon.bridge.errors import invalid_body, refusal
from haifctl.errors import HaifError, Kind

Endpoint = Callable[[Any, Request, str], Awaitable[Response]]


@dataclass(frozen=True)
class Direct:
    """One route served from the edge: its path (the ``route`` label of its metrics), its body
    model and its endpoint."""

    path: str
    model: type[BaseModel]
    endpoint: Endpoint


ROUTES = {
    route.path: route
    for route in (
        Direct("/infer", bodies.InferBody, generate.infer),
        Direct("/v1/completions", bodies.CompletionBody, generate.completions),
        Direct("/v1/chat/completions", bodies.ChatBody, generate.chat_completions),
    )
}


async def serve(app: FastAPI, route: Direct, scope: Any, receive: Any, send: Any) -> None:
    """Answer one request to ``route``; ``receive`` is the edge's (it enforces the body's size
    and pace)."""
    scope["app"] = app
    scope["route"] = route
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client left (or the edge answered the body itself)
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    request: Request = Request(scope, receive, send)
    metrics = app.state.bridge.metrics
    try:
        try:
            body = route.model.model_validate_json(b"".join(parts))
        except ValidationError as exc:
            raise invalid_body(exc.errors(include_url=False)) from None
        response = await route.endpoint(body, request, scope["state"]["key"])
    except HaifError as exc:
        response = refusal(metrics, exc)
    except Exception as exc:  # a bug: answered, logged, never a dropped connection
        log("bridge", "request failed", "error", route=route.path, error=repr(exc))
        response = refusal(metrics, HaifError("internal_error", repr(exc), kind=Kind.internal))
    await response(scope, receive, send)
