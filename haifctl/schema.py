"""The structured inference request (``haifctl infer --json``), validated with msgspec."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from haifctl.chat import Message
from haifctl.errors import InvalidInput
from haifctl.runtime.base import SamplingParams

MAX_STOP_STRINGS = 8
# Bounds every layer shares (the HTTP bridge's request bodies too): llama.cpp takes top_k as a
# C int, and msgpack, the wire's encoding, holds no integer over 2**64 - 1.
MAX_TOKENS_LIMIT = 1_048_576
MAX_TOP_K = 2**31 - 1
# What a max_tokens over the gateway's cap (HAIF_MAX_TOKENS_CAP) is told, by the gateway and by
# `haifctl infer` in-process alike.
MAX_TOKENS_HINT = (
    "ask for fewer (generation stops at the end of the model's context anyway), or raise "
    "HAIF_MAX_TOKENS_CAP"
)
MAX_PROMPTS = 64  # sequences one request may ask for (prompts x n)
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries


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
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    # token id (as a string, as JSON keys are) -> bias added to its logit
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    # constrained output: a GBNF grammar, a JSON schema, or OpenAI's response_format
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # log-probabilities of the generated tokens, with this many alternatives each
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # a prompt given as token ids; fill in the middle: ``prompt`` is what comes before
    prompt_ids: list[Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]] | None = None
    suffix: str | None = None
    # tools the chat template shows the model (OpenAI's shape)
    tools: list[dict[str, Any]] | None = None
    stream: bool = True
    # models on demand: how long the model stays loaded once idle (Ollama's keep_alive:
    # seconds or "5m"; 0 unloads after this request, -1 keeps it), and the worker labels a
    # load of it must carry
    keep_alive: float | str | None = None
    labels: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.keep_alive is not None:
            from haifctl.placement import parse_keep_alive

            try:
                parse_keep_alive(self.keep_alive)
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
        given = [n for n in ("prompt", "messages", "prompt_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `prompt`, `messages` and `prompt_ids`")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise ValueError("`prompt_ids` must hold at least one token")
        if self.suffix is not None and self.prompt is None:
            raise ValueError("`suffix` goes with a text `prompt`")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"`logit_bias` takes at most {MAX_LOGIT_BIAS} tokens")
            for key in self.logit_bias:
                if not key.isdigit() or int(key) >= 2**31:
                    raise ValueError(f"`logit_bias`: {key!r} is not a token id")
        constraints = [n for n in ("grammar", "json_schema", "response_format") if getattr(self, n)]
        if len(constraints) > 1:
            raise ValueError(f"give one of {', '.join(f'`{n}`' for n in constraints)}")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must hold at least one message")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"`stop` takes at most {MAX_STOP_STRINGS} strings")
        for name in ("model", "prompt", "system", "grammar", "suffix"):
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
        fields.pop("grammar", None)  # a model's defaults constrain nothing
        grammar = self.constraint()
        if grammar:
            fields["grammar"] = grammar
        if self.logit_bias:
            fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        try:
            return msgspec.convert(fields, SamplingParams)
        except msgspec.ValidationError as exc:
            raise InvalidInput(
                "invalid_model_params", f"the model's registered parameters are invalid: {exc}"
            ) from None

    def constraint(self) -> str:
        """The grammar the output must follow ("" for none): given as GBNF, or made from a JSON
        schema or OpenAI's ``response_format``."""
        from haifctl.grammar import response_format_grammar, schema_gbnf

        if self.grammar:
            return self.grammar
        if self.json_schema is not None:
            return schema_gbnf(self.json_schema)
        fmt = self.response_format
        if fmt is None or fmt.get("type") == "text":
            return ""
        if fmt.get("type") == "json_object":
            return response_format_grammar(None)
        if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            schema = fmt["json_schema"].get("schema")
            if isinstance(schema, dict):
                return schema_gbnf(schema)
        raise InvalidInput(
            "invalid_request",
            'response_format: expected {"type": "text" | "json_object"} or '
            '{"type": "json_schema", "json_schema": {"schema": {...}}}',
        )


SAMPLING_KEYS = tuple(
    k for k in SamplingParams.__struct_fields__ if k not in ("grammar", "logit_bias", "logprobs")
)
# What a model's registered params may hold besides sampling defaults: where and how long it
# stays loaded (the orchestrator reads them; sampling ignores them).
PLACEMENT_KEYS = ("keep_alive", "labels")


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
    "optional model, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, "
    "presence_penalty, frequency_penalty, logit_bias, seed, stop, grammar, json_schema, "
    "response_format, logprobs, stream"
)


# Requests that generate nothing: ``op`` names them in the request, which a generation leaves
# out.  The gateway validates them as it does a generation, the orchestrator routes an embed to
# a worker that loaded the model with embeddings, and the worker answers with one message.
MAX_EMBED_INPUTS = 256  # texts or token lists in one embed request
MAX_TOKEN_IDS = 262_144  # token ids in one request (a detokenize, an input given as ids)
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Embed each input (a text, or token ids) into one vector."""

    op: Literal["embed"]
    model: str | None = None
    input: list[str | list[TokenId]]

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("`input` must hold at least one text or token list")
        if len(self.input) > MAX_EMBED_INPUTS:
            raise ValueError(f"`input` takes at most {MAX_EMBED_INPUTS} items")
        for i, item in enumerate(self.input):
            if isinstance(item, str):
                _check_field(f"input[{i}]", item)
            elif not item:
                raise ValueError(f"`input[{i}]` must hold at least one token")
            elif len(item) > MAX_TOKEN_IDS:
                raise ValueError(f"`input[{i}]` takes at most {MAX_TOKEN_IDS} tokens")
        if self.model is not None:
            _check_field("model", self.model)

    @property
    def size(self) -> int:
        """Characters (or tokens) to embed: what the gateway's prompt limit counts."""
        return sum(len(item) for item in self.input)


class TokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Text to token ids, as llama-server's ``/tokenize``: ``add_special`` adds the model's
    beginning-of-text token, ``parse_special`` reads special tokens' text as those tokens,
    ``with_pieces`` answers each token's text too."""

    op: Literal["tokenize"]
    model: str | None = None
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "content"):
            value = getattr(self, name)
            if value is not None:
                _check_field(name, value)

    @property
    def size(self) -> int:
        return len(self.content)


class DetokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token ids to text, as llama-server's ``/detokenize``."""

    op: Literal["detokenize"]
    model: str | None = None
    tokens: list[TokenId]

    def __post_init__(self) -> None:
        if len(self.tokens) > MAX_TOKEN_IDS:
            raise ValueError(f"`tokens` takes at most {MAX_TOKEN_IDS} ids")
        if self.model is not None:
            _check_field("model", self.model)

    @property
    def size(self) -> int:
        return len(self.tokens)


OpRequest = EmbedRequest | TokenizeRequest | DetokenizeRequest
Request = InferenceRequest | OpRequest
OPS: dict[str, type[OpRequest]] = {
    "embed": EmbedRequest,
    "tokenize": TokenizeRequest,
    "detokenize": DetokenizeRequest,
}


def validate_any(fields: dict[str, Any], source: str = "request") -> Request:
    """A generation (no ``op``), or the request its ``op`` names, validated."""
    op = fields.get("op")
    if op is None:
        return validate_request(fields, source)
    kind = OPS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise InvalidInput(
            "invalid_request", f"{source}: op: {op!r} is not one of {', '.join(OPS)}"
        )
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise InvalidInput("invalid_request", f"{source}: {_field_error(str(exc))}") from None
