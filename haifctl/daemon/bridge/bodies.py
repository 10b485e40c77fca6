"""Request bodies: what ``/infer`` and the OpenAI routes accept, and how each becomes the request
fields the gateway takes (``haifctl.schema.InferenceRequest``).

Every body forbids fields it does not know: a field the server does not implement is a 400
naming it (``param``), never accepted and ignored.  Values are bounded as the request schema
bounds them, and text must be valid Unicode (JSON's ``"\\ud800"`` escape decodes to a lone
surrogate, which no UTF-8 encoder takes).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from haifctl.daemon.bridge.errors import HTTPError, unsupported
from haifctl.errors import HaifError
from haifctl.grammar import MAX_TOP_LOGPROBS, response_format_grammar, tool_choice_grammar
from haifctl.schema import MAX_PROMPTS, MAX_TOKENS_LIMIT, MAX_TOP_K, check_text

Text = Annotated[str, AfterValidator(check_text)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
Stop = Text | list[Text] | None
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
MAX_N = 16  # choices per request (each is a sequence on a worker)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(Strict):
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: TopK | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0, le=10)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop = None
    ignore_eos: bool | None = None
    grammar: Text | None = None
    json_schema: dict[str, Any] | None = None


KeepAlive = float | Text
Labels = dict[Text, Text]


class Placement(Strict):
    """Where a request runs, with models loaded on demand: how long its model stays loaded once
    idle (Ollama's ``keep_alive``: seconds or "5m"; 0 unloads after it, -1 keeps it) and the
    labels of the workers it may run on."""

    keep_alive: KeepAlive | None = None
    labels: Labels | None = None

    def placement(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.keep_alive is not None:
            out["keep_alive"] = self.keep_alive
        if self.labels is not None:
            out["labels"] = self.labels
        return out


class FunctionCall(Strict):
    name: Text
    arguments: Text


class ToolCall(Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported("messages", "only text content parts are supported")
            try:
                parts.append(check_text(part["text"]))
            except ValueError as exc:
                raise HTTPError("invalid_request", f"messages: {exc}", param="messages") from None
        return "".join(parts)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class InferBody(Placement):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    system: Text | None = None
    params: Sampling | None = None
    stream: bool = False

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "system": self.system}
        if self.messages is not None:
            out["messages"] = [m.fields() for m in self.messages]
            out.pop("prompt")
        if self.params is not None:
            out.update(self.params.model_dump(exclude_none=True))
        out.update(self.placement())
        return {k: v for k, v in out.items() if v is not None}


class StreamOptions(Strict):
    include_usage: bool = False


class JSONSchemaFormat(Strict):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDef(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: Text


class NamedTool(Strict):
    type: Literal["function"]
    function: NamedFunction


class OpenAIBase(Placement):
    model: Text | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    user: Text | None = None  # an end-user id: logged with the request, as OpenAI uses it
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # extensions, as llama.cpp's server has them
    top_k: TopK | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0, le=10)
    ignore_eos: bool = False
    grammar: Text | None = None
    json_schema: dict[str, Any] | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling fields every OpenAI route shares, as request fields."""
        out: dict[str, Any] = {
            "model": self.model or None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "ignore_eos": self.ignore_eos or None,
            "grammar": self.grammar,
            "json_schema": self.json_schema,
        }
        if self.logit_bias:
            out["logit_bias"] = logit_bias(self.logit_bias)
        out.update(self.placement())
        if self.grammar is not None and self.json_schema is not None:
            raise HTTPError(
                "invalid_request", "give one of grammar and json_schema", param="grammar"
            )
        return {k: v for k, v in out.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def logit_bias(bias: dict[str, float]) -> dict[str, float]:
    """OpenAI's ``{"token id": bias}``, keys checked to be token ids (the worker checks them
    against its vocabulary)."""
    for key in bias:
        if not key.isdigit() or int(key) >= 2**31:
            raise HTTPError(
                "invalid_request",
                f"logit_bias: {key!r} is not a token id (keys are token ids as strings)",
                param="logit_bias",
            )
    return {str(int(k)): v for k, v in bias.items()}


Prompt = Text | list[Text] | list[TokenId] | list[list[TokenId]]


class CompletionBody(OpenAIBase):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[dict[str, Any]]:
        """One request's prompt fields per prompt given (a string, token ids, or a list of
        either)."""
        prompt = self.prompt
        items: list[Any]
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise HTTPError("invalid_request", "prompt: give at least one prompt", param="prompt")
        if len(items) * self.n > MAX_PROMPTS:
            raise HTTPError(
                "invalid_request",
                f"prompt: {len(items)} prompts x n={self.n} is over {MAX_PROMPTS} sequences",
                param="prompt",
            )
        out: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, str):
                out.append({"prompt": item})
            elif not item:
                raise HTTPError("invalid_request", "prompt: a token list is empty", param="prompt")
            else:
                out.append({"prompt_ids": list(item)})
        return out

    def fields(self) -> dict[str, Any]:
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "only best_of equal to n (every sequence is returned)")
        out = {**self.sampling(), "max_tokens": self.max_tokens or 16}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.suffix is not None:
            out["suffix"] = self.suffix
        return out


class ChatBody(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.sampling(),
            "messages": [m.fields() for m in self.messages],
        }
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            out["max_tokens"] = max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise HTTPError(
                "invalid_request", "top_logprobs needs logprobs: true", param="top_logprobs"
            )
        if self.logprobs:
            out["logprobs"] = self.top_logprobs or 0
        constrained = "grammar" in out or "json_schema" in out
        try:
            if self.response_format is not None and self.response_format.type != "text":
                if constrained:
                    raise HTTPError(
                        "invalid_request",
                        "give one of response_format, grammar and json_schema",
                        param="response_format",
                    )
                schema = None
                if self.response_format.type == "json_schema":
                    if self.response_format.json_schema is None:
                        raise HTTPError(
                            "invalid_request",
                            "response_format: json_schema needs a json_schema object",
                            param="response_format",
                        )
                    schema = self.response_format.json_schema.schema_
                out["grammar"] = response_format_grammar(schema)
                constrained = True
            if self.tools:
                out["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
                grammar = tool_choice_grammar(out["tools"], self.tool_choice_value())
                if grammar is not None:
                    if constrained:
                        raise HTTPError(
                            "invalid_request",
                            "a tool call cannot be combined with response_format or a grammar",
                            param="tool_choice",
                        )
                    out["grammar"] = grammar
            elif self.tool_choice not in (None, "none", "auto"):
                raise HTTPError(
                    "invalid_request",
                    "tool_choice names a tool but no tools were given",
                    param="tool_choice",
                )
        except HaifError as exc:
            if isinstance(exc, HTTPError):
                raise
            param = {"unknown_tool": "tool_choice", "unsupported_tool_schema": "tools"}.get(
                exc.code, "response_format"
            )
            raise HTTPError(exc.code, exc.message, param=param) from None
        return out

    def tool_choice_value(self) -> str:
        """``none``, ``auto``, ``required``, or the name of the one function to call."""
        choice = self.tool_choice
        if choice is None:
            return "auto"
        if isinstance(choice, NamedTool):
            return "function:" + choice.function.name
        return choice
