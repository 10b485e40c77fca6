"""``POST /tokenize`` and ``POST /detokenize``, in llama-server's shapes, answered by a worker
serving the model named by ``model`` (the default model without one)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import AfterValidator, Field

from haifctl import wire
from haifctl.daemon.bridge.bodies import Strict
from haifctl.daemon.bridge.state import client_key, state
from haifctl.errors import HaifError
from haifctl.schema import MAX_TOKEN_IDS, check_text

router = APIRouter(tags=["llama-server"])

Text = Annotated[str, AfterValidator(check_text)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class TokenizeBody(Strict):
    model: Text | None = None
    content: Text
    add_special: bool = False  # the model's beginning-of-text token in front
    parse_special: bool = True  # special tokens' text read as those tokens
    with_pieces: bool = False  # each token's text too


class DetokenizeBody(Strict):
    model: Text | None = None
    tokens: list[TokenId] = Field(max_length=MAX_TOKEN_IDS)


async def answer(request: Request, fields: dict[str, Any], key: str) -> wire.Tokens:
    fields = {k: v for k, v in fields.items() if v is not None}
    tp = getattr(request.state, "traceparent", "")
    msg = await state(request).link.ask(fields, key, tp)
    if not isinstance(msg, wire.Tokens):
        raise HaifError("protocol_error", f"unexpected answer {type(msg).__name__}")
    return msg


def piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes when they are not whole UTF-8 characters (as llama-server
    answers)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request, key: str = Depends(client_key)) -> Any:
    """Text to the model's token ids (``with_pieces``: ``[{"id", "piece"}]``)."""
    msg = await answer(request, {"op": "tokenize", **body.model_dump()}, key)
    if body.with_pieces:
        pieces = [{"id": i, "piece": piece(p)} for i, p in zip(msg.ids, msg.pieces, strict=True)]
        return {"tokens": pieces}
    return {"tokens": msg.ids}


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeBody, request: Request, key: str = Depends(client_key)
) -> dict[str, Any]:
    """Token ids to text; an id outside the model's vocabulary is a 400."""
    msg = await answer(request, {"op": "detokenize", **body.model_dump()}, key)
    return {"content": msg.text}
