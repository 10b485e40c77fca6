"""Errors keep their kind end to end: on the wire, as an HTTP status, as an exit code."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest

from haifctl import wire
from haifctl.cli import EXIT_CODES
from haifctl.daemon.bridge import STATUS, HTTPError, status_of
from haifctl.errors import HaifError, InvalidInput, Kind, NotFound, Unavailable

PACKAGE = Path(__file__).resolve().parents[2] / "haifctl"


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (NotFound("model_not_found", "unknown model 'x'", "haifctl models list"), NotFound),
        (InvalidInput("invalid_model_ref", "'x:' is not a model reference"), InvalidInput),
        (Unavailable("registry_unreachable", "no answer", retry_after=2.0), Unavailable),
        (HaifError("rate_limited", "slow", "slow down", kind=Kind.overloaded), HaifError),
        (HaifError("deadline_exceeded", "late", kind=Kind.timeout), HaifError),
        (HaifError("decode_failed", "llama_decode returned 1"), HaifError),
    ],
)
def test_round_trip_through_a_frame(error: HaifError, cls: type[HaifError]) -> None:
    frame = wire.encode(error.to_wire(), "rid")
    sent = wire.decode(frame).msg
    assert isinstance(sent, wire.Error)
    back = HaifError.from_wire(sent)
    assert type(back) is cls  # so that `except NotFound` works across daemons
    assert (back.kind, back.code, back.message, back.hint, back.retry_after) == (
        error.kind,
        error.code,
        error.message,
        error.hint,
        error.retry_after,
    )


def test_a_frame_from_before_kinds_decodes_as_internal() -> None:
    old = {"t": "Error", "code": "model_not_found", "message": "unknown model", "hint": "h"}
    frame = msgspec.msgpack.encode([wire.PROTOCOL_VERSION, "rid", 0.0, "", old])
    msg = wire.decode(frame).msg
    assert msg == wire.Error(
        kind="internal", code="model_not_found", message="unknown model", hint="h"
    )
    assert HaifError.from_wire(msg).kind is Kind.internal


def test_a_kind_from_a_newer_peer_decodes_and_counts_as_internal() -> None:
    frame = wire.encode(wire.Error(kind="teapot", code="x", message="y"), "rid")
    msg = wire.decode(frame).msg
    assert isinstance(msg, wire.Error)
    error = HaifError.from_wire(msg)
    assert (type(error), error.kind, error.code) == (HaifError, Kind.internal, "x")


def test_every_kind_has_an_http_status_and_an_exit_code() -> None:
    assert set(STATUS) == set(Kind)
    assert set(EXIT_CODES) == set(Kind)
    # README.md, "Errors": 2 for bad input or unknown names, 3 for an unreachable service
    assert EXIT_CODES[Kind.invalid] == EXIT_CODES[Kind.not_found] == 2
    assert EXIT_CODES[Kind.unavailable] == 3
    assert EXIT_CODES[Kind.internal] == 1


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInput("invalid_request", "bad"), 400),
        (InvalidInput("invalid_model_ref", "'x:' is not a model reference"), 400),
        (HaifError("unauthorized", "no key", kind=Kind.unauthorised), 401),
        (HaifError("forbidden", "not yours", kind=Kind.forbidden), 403),
        (NotFound("model_not_found", "unknown model"), 404),
        (InvalidInput("prompt_too_large", "too long"), 413),
        (HTTPError("body_too_large", "too big"), 413),
        (HaifError("rate_limited", "slow", kind=Kind.overloaded), 429),
        (HaifError("overloaded", "full", kind=Kind.overloaded), 429),
        (HaifError("protocol_error", "huh"), 500),
        (Unavailable("registry_unreachable", "no answer"), 503),
        (Unavailable("worker_lost", "gone"), 503),
        (HaifError("deadline_exceeded", "late", kind=Kind.timeout), 504),
    ],
)
def test_http_status_of_an_error(error: HaifError, status: int) -> None:
    assert status_of(error) == status


def test_every_wire_error_built_in_the_package_names_its_kind() -> None:
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Error"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "wire"
                and not any(k.arg == "kind" for k in node.keywords)
            ):
                unnamed.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert unnamed == []
