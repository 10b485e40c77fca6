"""The one error type that reaches users: a kind, a stable code, a message and a hint.

The kind is the vocabulary every layer shares: it travels on the wire with the error, the HTTP
bridge turns it into a status and the CLI into an exit code.  The code says exactly what went
wrong, for people, logs and scripts.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from haifctl import wire


class Kind(StrEnum):
    """What sort of failure an error is: decides its HTTP status and its exit code."""

    invalid = "invalid"  # the request or the input is wrong; repeating it will not help
    not_found = "not_found"  # it names something that does not exist
    unauthorised = "unauthorised"  # no valid credentials
    forbidden = "forbidden"  # valid credentials, not allowed to do this
    overloaded = "overloaded"  # too much work right now: retry later
    unavailable = "unavailable"  # a service that is down, unreachable or shutting down
    timeout = "timeout"  # the request ran out of time
    internal = "internal"  # a fault of ours


class HaifError(Exception):
    """An error meant for a person: what went wrong and what to do about it.

    ``code`` is stable and machine-readable (it appears in ``--json`` output and on the wire);
    ``message`` says what happened; ``hint`` says what to try next; ``retry_after`` (seconds)
    says when trying again may help.  The subclasses below fix the kind; any kind can also be
    given to this class directly.
    """

    kind: Kind = Kind.internal

    def __init__(
        self,
        code: str,
        message: str,
        hint: str = "",
        *,
        kind: Kind | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        if kind is not None:
            self.kind = kind
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}

    def to_wire(self) -> wire.Error:
        return wire.Error(
            kind=self.kind.value,
            code=self.code,
            message=self.message,
            hint=self.hint,
            retry_after=self.retry_after,
        )

    @staticmethod
    def from_wire(error: wire.Error) -> HaifError:
        """The error a peer sent, as the class of its kind (so ``except NotFound`` works across
        daemons).  A kind this version does not know counts as internal."""
        try:
            kind = Kind(error.kind)
        except ValueError:
            kind = Kind.internal
        cls = _CLASSES.get(kind, HaifError)
        return cls(error.code, error.message, error.hint, kind=kind, retry_after=error.retry_after)

    def __str__(self) -> str:
        return self.message


class InvalidInput(HaifError):
    kind = Kind.invalid


class NotFound(HaifError):
    kind = Kind.not_found


class Unavailable(HaifError):
    kind = Kind.unavailable


_CLASSES: dict[Kind, type[HaifError]] = {
    cls.kind: cls for cls in (InvalidInput, NotFound, Unavailable)
}
