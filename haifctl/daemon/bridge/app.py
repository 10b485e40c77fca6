"""The bridge's application: the edge in front of a FastAPI app with the error handlers and the
routers, and the gateway link opened and closed with the app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from haifctl import __version__, security, tracing
from haifctl.daemon.base import log
from haifctl.daemon.bridge import embeddings, generate, health, models, page, tokens
from haifctl.daemon.bridge.edge import Auth, Edge, EdgeLimits
from haifctl.daemon.bridge.errors import install_handlers
from haifctl.daemon.bridge.link import GatewayLink
from haifctl.daemon.bridge.state import BridgeState
from haifctl.keys import KeyStore
from haifctl.telemetry import Metrics


def create_app(
    gateway: str,
    keys: KeyStore,
    *,
    on_ready: Callable[[], None] | None = None,
    metrics: Metrics | None = None,
    keyring: security.Keyring | None = None,
    host: str = "127.0.0.1",
    limits: EdgeLimits | None = None,
) -> Edge:
    """The bridge's ASGI application: the edge in front of the FastAPI app.  ``on_ready`` runs
    once the gateway link is open (the daemon announces itself there).  ``host`` is the address
    it listens on: off loopback, it serves protected routes only with API keys.  ``gateway`` may
    name several gateways, comma-separated: requests take turns over them."""
    gateways = [address.strip() for address in gateway.split(",") if address.strip()]
    tracer = tracing.setup("bridge")
    bridge = BridgeState(auth=Auth(keys, host), metrics=metrics, tracer=tracer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for address in gateways:
            link = GatewayLink(address, keyring)
            link.start()
            bridge.links.append(link)
        log("bridge", "gateway links open", gateways=",".join(gateways), auth=bridge.auth.mode())
        if on_ready is not None:
            on_ready()
        yield
        for link in bridge.links:
            await link.close()
        if tracer is not None:
            tracer.shutdown()
        log("bridge", "stopped")

    app = FastAPI(
        title="haifctl bridge",
        version=__version__,
        description="REST and OpenAI-compatible access to a haifctl cluster.",
        lifespan=lifespan,
        docs_url=None,  # served from the package's own assets (page.docs), not a CDN
        redoc_url=None,
    )
    app.state.bridge = bridge
    install_handlers(app)
    for module in (health, models, generate, embeddings, tokens, page):
        app.include_router(module.router)
    page.mount_assets(app)
    # The edge goes in front of FastAPI, not inside its middleware stack: a generating route's
    # request and every frame of its stream then pass through no layer but the edge.
    return Edge(app, metrics, tracer, bridge.auth, limits or EdgeLimits())
