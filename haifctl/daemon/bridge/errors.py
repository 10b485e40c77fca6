"""One error vocabulary at the HTTP edge: every refusal, whichever layer makes it, is a
:class:`HaifError` answered in the OpenAI shape with the status of its kind."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from haifctl.errors import HaifError, Kind
from haifctl.telemetry import Metrics

# The HTTP status of each kind of error.
STATUS = {
    Kind.invalid: 400,
    Kind.unauthorised: 401,
    Kind.forbidden: 403,
    Kind.not_found: 404,
    Kind.overloaded: 429,
    Kind.internal: 500,
    Kind.unavailable: 503,
    Kind.timeout: 504,
}
# Invalid input that HTTP has a finer status for: clients act on 413 (shrink the request) where a
# plain 400 would only tell them to fix it.
STATUS_OF_CODE = {"prompt_too_large": 413, "body_too_large": 413, "body_timeout": 408}


def status_of(error: HaifError) -> int:
    return getattr(error, "status", None) or STATUS_OF_CODE.get(error.code) or STATUS[error.kind]


def public_message(error: HaifError) -> str:
    """The message of an error response, which has no field of its own for the hint."""
    return error.message + (f" ({error.hint})" if error.hint else "")


class HTTPError(HaifError):
    """A mistake the bridge finds in a request itself, naming the field it is about (the
    OpenAI error body's ``param``)."""

    kind = Kind.invalid

    def __init__(
        self, code: str, message: str, param: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.param = param
        self.status = status


def unsupported(param: str, message: str) -> HTTPError:
    """A field the bridge does not implement (or not with this value): refused, never
    accepted and ignored."""
    return HTTPError("unsupported", f"{param}: {message}", param=param)


def error_body(error: HaifError) -> dict[str, Any]:
    status = status_of(error)
    error_type = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        error_type = "authentication_error"
    elif status == 429:
        error_type = "rate_limit_error"
    return {
        "error": {
            "message": public_message(error),
            "type": error_type,
            "param": getattr(error, "param", None),
            "code": error.code,
        }
    }


def error_response(error: HaifError, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``: the
    one shape every refusal of the bridge has, whichever layer makes it."""
    status = status_of(error)
    headers = dict(headers or {})
    if error.retry_after is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after or 1)))
    return JSONResponse(error_body(error), status_code=status, headers=headers)


def refusal(metrics: Metrics | None, error: HaifError) -> JSONResponse:
    """The response to a refused request, counted when the bridge itself refused it (the
    gateway counts its own)."""
    if metrics is not None and status_of(error) in (400, 401, 413):
        metrics.rejected.labels("bridge", error.code).inc()
    return error_response(error)


def invalid_body(errors: Sequence[Any]) -> HaifError:
    """One error for a body that failed validation, naming the field: an unknown field first
    (the server does not implement it), then a value our validators refused (it says more than
    the union member it did not match), then the first."""
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    first = first or next((e for e in errors if e.get("type") == "value_error"), None)
    first = first or (errors[0] if errors else {})
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _tag(p))
    if first.get("type") == "extra_forbidden":
        return unsupported(
            where, "this server does not implement this field (see the README's table)"
        )
    said = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{where}: {said}" if where else said
    return HTTPError("invalid_request", message, param=where or None)


def install_handlers(app: FastAPI) -> None:
    """Answer every exception a route or FastAPI itself raises in the OpenAI shape."""

    @app.exception_handler(HaifError)
    async def _haif_error(request: Request, exc: HaifError) -> Response:
        return refusal(request.app.state.bridge.metrics, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return await _haif_error(request, invalid_body(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own refusals (no such route, wrong method) in the OpenAI shape too."""
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request" if exc.status_code == 400 else "http_error"
        )
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{request.method} {request.url.path}: {message.lower()}"
        error = HTTPError(code, message, status=exc.status_code)
        return error_response(error, dict(exc.headers or {}))


def _tag(part: Any) -> bool:
    """Whether a part of a pydantic error location names a union member (``str``,
    ``list[...]``, ``function-after[...]``) rather than a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
