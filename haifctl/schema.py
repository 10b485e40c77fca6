"""The structured inference request (``haifctl infer --json``), validated with msgspec."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from haifctl.chat import Message
from haifctl.errors import InvalidInput
from haifctl.runtime.base import SamplingParams

MAX_STOP_STRINGS = 8
# Bounds every layer shares (the HTTP bridge's request bodies too): llama.cpp takes top_k as a
# C int, and msgpack, the wire's encoding, holds no integer over 2**64 - 1.
MAX_TOKENS_LIMIT = 1_048_576
MAX_TOP_K = 2**31 - 1


def check_text(value: str) -> str:
    """``value`` if it is valid Unicode, else ValueError: a lone surrogate (what JSON's
    ``"\\ud800"`` escape or an undecodable command-line byte becomes) has no UTF-8 encoding, so no
    daemon could send or tokenize it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone surrogate (U+{ord(value[exc.start]):04X}) at index {exc.start}, "
            "which is not valid Unicode"
        ) from None
    return value


class InferenceRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One completion request: a ``prompt`` or chat ``messages``, and sampling parameters."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    system: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_K)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    stream: bool = True

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must hold at least one message")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"`stop` takes at most {MAX_STOP_STRINGS} strings")
        for name in ("model", "prompt", "system"):
            value = getattr(self, name)
            if value is not None:
                _check_field(name, value)
        for i, message in enumerate(self.messages or ()):
            _check_field(f"messages[{i}].content", message.content)
        for i, stop in enumerate(self.stops):
            _check_field(f"stop[{i}]" if isinstance(self.stop, list) else "stop", stop)

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def chat_messages(self) -> list[Message] | None:
        """The messages to render, with ``system`` in front; None for a plain prompt."""
        if self.messages is None and self.system is None:
            return None
        messages = list(self.messages or [Message("user", self.prompt or "")])
        if self.system is not None and not (messages and messages[0].role == "system"):
            messages.insert(0, Message("system", self.system))
        return messages

    def sampling(self, defaults: dict[str, Any], max_tokens: int) -> SamplingParams:
        """Merge: this request > the model's registered defaults > haifctl's defaults."""
        fields: dict[str, Any] = {"max_tokens": max_tokens}
        fields.update({k: v for k, v in defaults.items() if k in SAMPLING_KEYS})
        for key in SAMPLING_KEYS:
            value = getattr(self, key, None)
            if value is not None and key != "stop":
                fields[key] = value
        if self.stop is not None:
            fields["stop"] = self.stops
        elif "stop" in fields:
            stop = fields["stop"]
            fields["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        try:
            return msgspec.convert(fields, SamplingParams)
        except msgspec.ValidationError as exc:
            raise InvalidInput(
                "invalid_model_params", f"the model's registered parameters are invalid: {exc}"
            ) from None


SAMPLING_KEYS = tuple(SamplingParams.__struct_fields__)


def _check_field(name: str, value: str) -> None:
    try:
        check_text(value)
    except ValueError as exc:
        raise ValueError(f"`{name}`: {exc}") from None


def decode_request(data: bytes, source: str = "payload") -> InferenceRequest:
    """Parse and validate JSON; errors name the field and the problem in one line."""
    try:
        return msgspec.json.decode(data, type=InferenceRequest)
    except msgspec.ValidationError as exc:
        raise InvalidInput(
            "invalid_request", f"{source}: {_field_error(str(exc))}", _REQUEST_HINT
        ) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(
            "invalid_json", f"{source} is not valid JSON: {exc}", _REQUEST_HINT
        ) from None


def validate_request(fields: dict[str, Any], source: str = "request") -> InferenceRequest:
    try:
        return msgspec.convert(fields, InferenceRequest)
    except msgspec.ValidationError as exc:
        raise InvalidInput("invalid_request", f"{source}: {_field_error(str(exc))}") from None


def _field_error(message: str) -> str:
    """msgspec says 'Expected `int`, got `str` - at `$.max_tokens`'; lead with the field."""
    text, sep, where = message.rpartition(" - at `$")
    if not sep:
        return message
    field = where.rstrip("`").lstrip(".")
    return f"{field}: {text[0].lower()}{text[1:]}"


_REQUEST_HINT = (
    'expected {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} with '
    "optional model, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop, "
    "stream"
)
