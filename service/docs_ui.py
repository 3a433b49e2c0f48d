"""``/docs``: Swagger UI 5 served from the ``fastapi-offline`` package's files, so it works offline.

FastAPI's default page loads its script and stylesheet from a CDN and is blank without internet access.
Swagger UI must be 5.x: FastAPI serves OpenAPI 3.1, which 4.x cannot render ("Unable to render this
definition"). ``fastapi-offline`` is used only as the carrier of those files (its ``static`` folder, checked
at start-up and by tests/service/test_docs_ui.py), not for its app factory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def swagger_ui_folder() -> Path:
    """The folder holding Swagger UI's bundle, stylesheet and icon (``ASSETS``)."""
    try:
        folder = Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        raise RuntimeError(
            "/docs needs the fastapi-offline package: pip install 'refinedet[serve]'"
        ) from None
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(
            f"fastapi-offline's Swagger UI files {missing} are not in {folder}: /docs needs them"
        )
    return folder


def install_swagger_ui(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` and its assets under ``/docs/assets`` (create the app with
    ``docs_url=None`` so that FastAPI's CDN page is not registered as well)."""
    openapi_url = app.openapi_url or "/openapi.json"
    title = f"{app.title} - Swagger UI"
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_folder()), name="swagger-ui-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        )
