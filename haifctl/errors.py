"""The one error type that reaches users: a stable code, a message and a hint."""

from __future__ import annotations

from typing import Any


class HaifError(Exception):
    """An error meant for a person: what went wrong and what to do about it.

    ``code`` is stable and machine-readable (it appears in ``--json`` output and, later, on the
    wire); ``message`` says what happened; ``hint`` says what to try next.
    """

    exit_code = 1

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}

    def __str__(self) -> str:
        return self.message


class NotFound(HaifError):
    exit_code = 2


class InvalidInput(HaifError):
    exit_code = 2


class Unavailable(HaifError):
    exit_code = 3
