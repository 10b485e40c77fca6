"""Turning chat messages into a prompt.

When the GGUF carries a chat template (``tokenizer.chat_template``), it is rendered as Hugging Face
does: Jinja2 with ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, in a
sandbox (the template comes from a file, not from us).  When it carries none, the fallback is a
plain transcript that base models continue naturally::

    <system text>

    User: <text>
    Assistant: <text>
    User: <text>
    Assistant:
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import msgspec

from haifctl.errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")


def fallback_prompt(messages: Sequence[Message]) -> str:
    parts: list[str] = []
    for message in messages:
        if message.role == "system":
            parts.append(f"{message.content}\n\n")
        else:
            speaker = "User" if message.role in ("user", "tool") else "Assistant"
            parts.append(f"{speaker}: {message.content}\n")
    parts.append("Assistant:")
    return "".join(parts)


def _raise(message: str) -> NoReturn:
    raise InvalidInput("chat_template_error", f"the model's chat template refused: {message}")


def render_template(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str | None,
    eos_token: str | None,
) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    context: dict[str, Any] = {
        "messages": [msgspec.to_builtins(m) for m in messages],
        "add_generation_prompt": True,
        "bos_token": bos_token or "",
        "eos_token": eos_token or "",
    }
    try:
        return env.from_string(template).render(**context)
    except TemplateError as exc:
        raise InvalidInput(
            "chat_template_error",
            f"the model's chat template could not be rendered: {exc}",
            "send a plain prompt instead of messages, or fix the template in the GGUF",
        ) from None


def build_prompt(
    messages: Sequence[Message],
    template: str | None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    if not messages:
        raise InvalidInput("invalid_request", "messages: must hold at least one message")
    if template:
        return render_template(template, messages, bos_token=bos_token, eos_token=eos_token)
    return fallback_prompt(messages)
