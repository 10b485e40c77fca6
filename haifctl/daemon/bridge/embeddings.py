"""``POST /v1/embeddings``: one L2-normalised vector per input, from a worker that loaded the
model with embeddings (``haifctl worker --embeddings``); the orchestrator sends the request to
no other.  Input is a text, a list of texts, a list of token ids, or a list of such lists, as
OpenAI takes it; ``encoding_format`` ``float`` or ``base64`` (little-endian float32, which the
OpenAI SDK asks for by default)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import AfterValidator, Field

from haifctl import wire
from haifctl.daemon.bridge.bodies import Strict
from haifctl.daemon.bridge.errors import HTTPError, unsupported
from haifctl.daemon.bridge.render import embedding_value
from haifctl.daemon.bridge.state import client_key, state
from haifctl.errors import HaifError
from haifctl.schema import MAX_EMBED_INPUTS, check_text

router = APIRouter(tags=["openai"])

Text = Annotated[str, AfterValidator(check_text)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class EmbeddingsBody(Strict):
    model: Text | None = None
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    # the model's own size only: these vectors cannot be shortened
    dimensions: int | None = Field(None, ge=1)
    user: Text | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs as the worker takes them: texts, or lists of token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if not value:
            raise HTTPError("invalid_request", "input: give at least one text", param="input")
        if all(isinstance(item, int) for item in value):  # one input as token ids
            return [[int(item) for item in value]]  # type: ignore[arg-type]
        items: list[str | list[int]] = list(value)  # type: ignore[arg-type]
        if len(items) > MAX_EMBED_INPUTS:
            raise HTTPError(
                "invalid_request",
                f"input: {len(items)} items; at most {MAX_EMBED_INPUTS} per request",
                param="input",
            )
        return items


@router.post("/v1/embeddings")
async def embeddings(
    body: EmbeddingsBody, request: Request, key: str = Depends(client_key)
) -> dict[str, Any]:
    """OpenAI embeddings: one L2-normalised vector per input, in order."""
    fields: dict[str, Any] = {"op": "embed", "input": body.inputs()}
    if body.model is not None:
        fields["model"] = body.model
    if body.user is not None:
        span = getattr(request.state, "span", None)
        if span is not None:
            span.set_attribute("enduser.id", body.user)
    tp = getattr(request.state, "traceparent", "")
    answer = await state(request).link.ask(fields, key, tp)
    if not isinstance(answer, wire.Embeddings):
        raise HaifError("protocol_error", f"unexpected answer {type(answer).__name__}")
    vectors = [wire.float32_list(v) for v in answer.vectors]
    size = len(vectors[0]) if vectors else 0
    if body.dimensions is not None and body.dimensions != size:
        raise unsupported(
            "dimensions",
            f"{answer.model} gives vectors of {size} numbers, and they cannot be shortened "
            f"to {body.dimensions}; leave dimensions out or set it to {size}",
        )
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": embedding_value(vector, body.encoding_format),
            }
            for i, vector in enumerate(vectors)
        ],
        "model": body.model or answer.model,
        "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens},
    }
