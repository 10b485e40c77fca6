"""What every route reads: the bridge's shared state, kept on ``app.state.bridge``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from haifctl.errors import HaifError, Kind

if TYPE_CHECKING:  # the edge serves routes that read this state: no import cycle at run time
    from haifctl import tracing
    from haifctl.daemon.bridge.edge import Auth
    from haifctl.daemon.bridge.link import GatewayLink
    from haifctl.telemetry import Metrics


@dataclass
class BridgeState:
    auth: Auth
    metrics: Metrics | None
    tracer: tracing.Tracing | None
    links: list[GatewayLink] = field(default_factory=list)

    @property
    def link(self) -> GatewayLink:
        return self.links[0]


def state(request: Request) -> BridgeState:
    bridge: BridgeState = request.app.state.bridge
    return bridge


async def client_key(request: Request) -> str:
    """The caller's key id, as the edge checked it before reading the body."""
    key = getattr(request.state, "key", None)
    if key is None:  # a route needing a key that the edge does not guard: never serve it
        raise HaifError("unauthorized", "this route needs an API key", kind=Kind.unauthorised)
    return str(key)
