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
    """Ready when a gateway answers (with several, ``gateways`` says how many), at least one
    worker serves a model and the bridge can let clients in (``auth``: keys, loopback, or
    locked with no keys off loopback)."""
    bridge = state(request)
    mode = bridge.auth.mode()
    extra: dict[str, Any] = {"auth": mode}
    if mode == "locked":
        extra["detail"] = public_message(bridge.auth.locked())
    reason = ""
    workers = 0
    gateways = 0  # answering and ready
    for link in bridge.links:
        try:
            pong = await link.call(wire.Ping(), 1.0)
            stats = await link.call(wire.StatsRequest(), 2.0)
        except HaifError as exc:
            reason = exc.message
            continue
        if isinstance(pong, wire.Pong) and pong.ready:
            gateways += 1
        if isinstance(stats, wire.Stats):
            workers = max(workers, len(stats.workers))
    if not gateways and reason:
        return JSONResponse({"status": "unavailable", "reason": reason, **extra}, 503)
    if len(bridge.links) > 1:
        extra["gateways"] = f"{gateways}/{len(bridge.links)}"
    ready = gateways > 0 and workers > 0 and mode != "locked"
    body = {"status": "ready" if ready else "unavailable", "workers": workers, **extra}
    return JSONResponse(body, 200 if ready else 503)
