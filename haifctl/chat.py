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


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    role: str
    content: str
    # an assistant's tool calls (OpenAI's shape), a tool result's call id and the tool's name
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")


def tools_preamble(tools: Sequence[dict[str, Any]]) -> str:
    """How a model without a template for tools learns of them: each function's signature,
    and the one form of a call."""
    import json

    lines = ["You can call these tools:"]
    for tool in tools:
        function = tool.get("function", {})
        lines.append(json.dumps(function, ensure_ascii=False))
    lines.append(
        'To call one, answer with only {"name": "<tool name>", "arguments": {<its arguments>}}.'
    )
    return "\n".join(lines) + "\n\n"


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    return (
        f'{{"name": "{function.get("name", "")}", "arguments": {function.get("arguments", "{}")}}}'
    )


def fallback_prompt(
    messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
) -> str:
    parts: list[str] = [tools_preamble(tools)] if tools else []
    for message in messages:
        content = message.content
        if message.tool_calls:
            content = "\n".join([content, *map(_call_text, message.tool_calls)]).strip()
        if message.role == "system":
            parts.append(f"{content}\n\n")
        elif message.role == "tool":
            parts.append(f"Tool ({message.name or message.tool_call_id or 'result'}): {content}\n")
        else:
            speaker = "User" if message.role == "user" else "Assistant"
            parts.append(f"{speaker}: {content}\n")
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
    tools: Sequence[dict[str, Any]] | None = None,
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
    if tools:
        context["tools"] = list(tools)
        if "tools" not in template:  # a template that cannot show them: say it in words
            context["messages"].insert(0, {"role": "system", "content": tools_preamble(tools)})
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
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    if not messages:
        raise InvalidInput("invalid_request", "messages: must hold at least one message")
    if template:
        return render_template(
            template, messages, bos_token=bos_token, eos_token=eos_token, tools=tools
        )
    return fallback_prompt(messages, tools)
