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


async def registered(request: Request) -> list[wire.ModelEntry]:
    answer = await state(request).link.call(wire.ListModels(), 5.0)
    if isinstance(answer, wire.Error):
        raise HaifError.from_wire(answer)
    if not isinstance(answer, wire.ModelList):
        raise Unavailable("unavailable", "unexpected gateway answer")
    return answer.models


def entry(model_id: str, m: wire.ModelEntry) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": _epoch(m.created_at),
        "owned_by": "haifctl",
        "status": m.status,
        "workers": m.workers,
        "loadable": m.loadable,  # no worker has it, but one would load it on first use
    }


async def model_entries(request: Request) -> list[dict[str, Any]]:
    return [entry(i, m) for m in await registered(request) for i in (m.ref, *m.aliases)]


@router.get("/v1/models")
async def list_models(request: Request, key: str = Depends(client_key)) -> dict[str, Any]:
    """The registered models, served or not (``workers`` says how many workers serve each)."""
    return {"object": "list", "data": await model_entries(request)}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(
    model_id: str, request: Request, key: str = Depends(client_key)
) -> dict[str, Any]:
    """One registered model by NAME:VERSION, alias, or name (its newest version, as a request
    naming it is served)."""
    models = await registered(request)
    for m in models:
        if model_id == m.ref or model_id in m.aliases:
            return entry(model_id, m)
    versions = [m for m in models if m.name == model_id]
    if versions:
        return entry(model_id, max(versions, key=lambda m: m.created_at))
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
