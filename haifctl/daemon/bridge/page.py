"""The chat page (``/``) and the API's documentation (``/docs``), both served from the package:
nothing is fetched from a CDN, so they work on a machine without internet."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)
ASSETS = "/docs/assets"


@cache
def _page() -> str:
    return (resources.files("haifctl") / "web" / "index.html").read_text(encoding="utf-8")


@router.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse(_page())


@router.get("/docs")
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="haifctl bridge - API",
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
    )


def mount_assets(app: FastAPI) -> None:
    """Swagger UI's files, from the swagger-ui-bundle package."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS, StaticFiles(directory=Path(swagger_ui_path)), name="docs-assets")
