"""The HTTP bridge: REST ``/infer``, an OpenAI-compatible API with SSE streaming, the chat page
and the API's docs, all translated to gateway RPCs.  No business logic lives here: validation,
limits and scheduling are the gateway's and the orchestrator's.

``app`` builds the application from the routers (``health``, ``models``, ``generate``,
``page``); ``edge`` guards it (keys, body limits, timeouts); ``bodies`` holds the request
bodies; ``render`` the three answers' shapes; ``link`` the one ZeroMQ link to the gateway;
``daemon`` runs it on uvicorn.
"""

from haifctl.daemon.bridge.app import create_app
from haifctl.daemon.bridge.daemon import BridgeDaemon, parse_http_bind
from haifctl.daemon.bridge.edge import MAX_BODY_BYTES, EdgeLimits
from haifctl.daemon.bridge.errors import STATUS, HTTPError, status_of

__all__ = [
    "MAX_BODY_BYTES",
    "STATUS",
    "BridgeDaemon",
    "EdgeLimits",
    "HTTPError",
    "create_app",
    "parse_http_bind",
    "status_of",
]
