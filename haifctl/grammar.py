"""Constrained output: JSON schemas and tool calls turned into llama.cpp grammars (GBNF), and
tool calls read back from the text a model wrote.

The schema converter is llama.cpp's own (through llama-cpp-python).  It silently skips keywords
it cannot enforce (``minimum``, ``uniqueItems``, ...), so every schema is checked here first:
a keyword outside what the converter enforces is refused, naming it, never downgraded.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from haifctl.errors import InvalidInput

MAX_TOP_LOGPROBS = 20
MAX_SCHEMA_BYTES = 64 * 1024

# What llama.cpp's converter enforces, and what only annotates.
ENFORCED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "$ref",
    "$defs",
    "definitions",
    "pattern",
    "format",
    "minLength",
    "maxLength",
}
ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples"}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# Keywords whose value is a map of name -> schema, or a list of schemas.
SCHEMA_MAPS = ("properties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "prefixItems")
STRING_SHAPES = ("pattern", "format", "minLength", "maxLength")
HINTS = {
    "oneOf": "use anyOf (one-of exclusivity cannot be enforced while generating)",
    "allOf": "merge the schemas into one",
}


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse what the converter would not enforce: unknown keywords, formats and types,
    references outside the document."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _refused(f"{where}: a schema must be an object, not {type(schema).__name__}")
    for key, value in schema.items():
        at = f"{where}.{key}"
        if key not in ENFORCED and key not in ANNOTATIONS:
            hint = HINTS.get(key, "it cannot be enforced while generating")
            raise _refused(
                f"{at}: the keyword {key!r} is not supported in structured output ({hint})"
            )
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in TYPES]
            if bad:
                raise _refused(f"{at}: unknown type {bad[0]!r}")
        elif key == "format" and value not in FORMATS:
            raise _refused(
                f"{at}: the format {value!r} is not supported (supported: "
                f"{', '.join(sorted(FORMATS))})"
            )
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise _refused(f"{at}: only references inside the schema (#/...) are supported")
        elif key in SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise _refused(f"{at}: must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{at}.{name}")
        elif key in SCHEMA_LISTS:
            if not isinstance(value, list):
                raise _refused(f"{at}: must be a list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{at}[{i}]")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, at)
        elif key == "required" and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise _refused(f"{at}: must be a list of property names")
    shapes = [k for k in ("$ref", "anyOf") if k in schema]
    others = [k for k in schema if k in ENFORCED and k not in ("$defs", "definitions", *shapes)]
    if shapes and others:
        raise _refused(
            f"{where}: {shapes[0]!r} together with {others[0]!r} is not supported "
            f"(move {others[0]!r} into the referenced or listed schemas)"
        )
    strings = [k for k in STRING_SHAPES if k in schema]
    if len(strings) > 1 and set(strings) != {"minLength", "maxLength"}:
        raise _refused(
            f"{where}: {strings[0]!r} together with {strings[1]!r} is not supported "
            "(a string takes a pattern, a format, or length bounds)"
        )


def normalised(schema: Any) -> Any:
    """``schema`` with each list of types spelt as ``anyOf`` (the converter would drop the other
    keywords beside a list of types)."""
    if isinstance(schema, list):
        return [normalised(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: normalised(v) if k not in ("enum", "const", "default", "examples") else v
        for k, v in schema.items()
    }
    types = out.get("type")
    if isinstance(types, list):
        rest = {k: v for k, v in out.items() if k not in ("type", "$defs", "definitions")}
        out = {k: v for k, v in out.items() if k in ("$defs", "definitions")}
        out["anyOf"] = [{**rest, "type": t} for t in types]
    return out


def _refused(message: str) -> InvalidInput:
    return InvalidInput("unsupported_schema", message)


@lru_cache(maxsize=256)
def _schema_gbnf(text: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = str(json_schema_to_gbnf(text))
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise _refused(f"schema: cannot be turned into a grammar: {exc}") from None
    # The converter's string character takes control characters, which JSON strings may not
    # hold unescaped (a raw newline in a string would not parse): exclude them, as llama.cpp's
    # own converter does.
    lines = grammar.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("char ::= "):
            lines[i] = line.replace('[^"\\\\]', '[^"\\\\\\x7F\\x00-\\x1F]', 1)
    return "\n".join(lines) + "\n"


def schema_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar whose sentences are exactly the JSON documents ``schema`` allows."""
    check_schema(schema)
    text = json.dumps(normalised(schema), sort_keys=True)
    if len(text) > MAX_SCHEMA_BYTES:
        raise _refused(f"schema: over {MAX_SCHEMA_BYTES // 1024} KiB")
    return _schema_gbnf(text)


def response_format_grammar(schema: dict[str, Any] | None) -> str:
    """``response_format``'s grammar: any JSON object (``json_object``), or ``schema``'s."""
    return schema_gbnf(schema if schema is not None else {"type": "object"})


# --- tools ------------------------------------------------------------------------------------


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_choice_grammar(tools: list[dict[str, Any]], choice: str) -> str | None:
    """The grammar a tool call must follow: ``{"name": ..., "arguments": {...}}`` for one of
    ``tools`` (``required``) or for the named one (``function:NAME``); None when the model may
    answer in text (``auto``, ``none``).  Every tool's parameters are checked either way."""
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    for name, function in functions.items():
        try:
            check_schema(function.get("parameters") or {"type": "object"})
        except InvalidInput as exc:
            raise InvalidInput("unsupported_tool_schema", f"tools: {name}: {exc.message}") from None
    if choice in ("auto", "none"):
        return None
    if choice.startswith("function:"):
        name = choice.removeprefix("function:")
        if name not in functions:
            raise InvalidInput(
                "unknown_tool", f"tool_choice: no tool named {name!r} among the tools given"
            )
        return schema_gbnf(_call_schema(functions[name]))
    return schema_gbnf({"anyOf": [_call_schema(f) for f in functions.values()]})


TOOL_CALL_TAG = re.compile(r"^\s*<tool_call>\s*(.*?)\s*(?:</tool_call>\s*)?$", re.DOTALL)


def parse_tool_call(text: str, tools: list[dict[str, Any]]) -> tuple[str, str] | None:
    """``(name, arguments as JSON)`` when ``text`` is one call of one of ``tools``: the JSON
    object ``{"name", "arguments"}`` (bare, or in ``<tool_call>`` tags as several chat templates
    write it); None for any other text."""
    match = TOOL_CALL_TAG.match(text)
    body = match.group(1) if match else text.strip()
    if not body.startswith("{"):
        return None
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict):
        return None
    names = {tool["function"]["name"] for tool in tools}
    name = call.get("name")
    arguments = call.get("arguments", call.get("parameters"))
    if name not in names or not isinstance(arguments, dict):
        return None
    return str(name), json.dumps(arguments, ensure_ascii=False)
