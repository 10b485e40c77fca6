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
    turn: int = 0

    @property
    def link(self) -> GatewayLink:
        """The link for the next request: the gateways take turns, skipping any whose
        connection is down (while all are down, the turn goes on and the request waits in its
        link's queue, or fails as the link's watch decides)."""
        links = self.links
        for _ in range(len(links)):
            self.turn = (self.turn + 1) % len(links)
            if links[self.turn].up:
                return links[self.turn]
        return links[self.turn]


def state(request: Request) -> BridgeState:
    bridge: BridgeState = request.app.state.bridge
    return bridge


async def client_key(request: Request) -> str:
    """The caller's key id, as the edge checked it before reading the body."""
    key = getattr(request.state, "key", None)
    if key is None:  # a route needing a key that the edge does not guard: never serve it
        raise HaifError("unauthorized", "this route needs an API key", kind=Kind.unauthorised)
    return str(key)
