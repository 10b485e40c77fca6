"""``GET /v1/models`` and ``GET /v1/models/{id}``: the registered models (an alias is listed as
a model too), served or not, with how many workers serve each."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request

from haifctl import wire
from haifctl.daemon.bridge.state import client_key, state
from haifctl.errors import HaifError, NotFound, Unavailable

router = APIRouter(tags=["openai"])


async def model_entries(request: Request) -> list[dict[str, Any]]:
    answer = await state(request).link.call(wire.ListModels(), 5.0)
    if isinstance(answer, wire.Error):
        raise HaifError.from_wire(answer)
    if not isinstance(answer, wire.ModelList):
        raise Unavailable("unavailable", "unexpected gateway answer")
    data = []
    for m in answer.models:
        created = _epoch(m.created_at)
        for model_id in (m.ref, *m.aliases):
            data.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "haifctl",
                    "status": m.status,
                    "workers": m.workers,
                }
            )
    return data


@router.get("/v1/models")
async def list_models(request: Request, key: str = Depends(client_key)) -> dict[str, Any]:
    """The registered models, served or not (``workers`` says how many workers serve each)."""
    return {"object": "list", "data": await model_entries(request)}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(
    model_id: str, request: Request, key: str = Depends(client_key)
) -> dict[str, Any]:
    """One registered model by name, NAME:VERSION or alias."""
    for entry in await model_entries(request):
        if entry["id"] == model_id:
            return entry
    raise NotFound(
        "model_not_found",
        f"no model {model_id!r} is registered",
        "GET /v1/models lists the registered ones",
    )


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0
