"""``/healthz`` (alive) and ``/readyz`` (the gateway answers and a worker serves a model)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from haifctl import wire
from haifctl.daemon.bridge.errors import public_message
from haifctl.daemon.bridge.state import state
from haifctl.errors import HaifError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The bridge is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
async def readyz(request: Request) -> Response:
    """Ready when the gateway answers, at least one worker serves a model and the bridge can let
    clients in (``auth``: keys, loopback, or locked with no keys off loopback)."""
    bridge = state(request)
    mode = bridge.auth.mode()
    extra: dict[str, Any] = {"auth": mode}
    if mode == "locked":
        extra["detail"] = public_message(bridge.auth.locked())
    try:
        pong = await bridge.link.call(wire.Ping(), 1.0)
        stats = await bridge.link.call(wire.StatsRequest(), 2.0)
    except HaifError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message, **extra}, 503)
    workers = len(stats.workers) if isinstance(stats, wire.Stats) else 0
    ready = isinstance(pong, wire.Pong) and pong.ready and workers > 0 and mode != "locked"
    body = {"status": "ready" if ready else "unavailable", "workers": workers, **extra}
    return JSONResponse(body, 200 if ready else 503)
