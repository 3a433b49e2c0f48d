"""``/docs``: Swagger UI served from the ``swagger-ui-bundle`` package's files, so it works offline.

FastAPI's default page loads its script and stylesheet from a CDN and is blank without internet access.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def install_swagger_ui(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` and its assets under ``/docs/assets`` (create the app with
    ``docs_url=None`` so that FastAPI's CDN page is not registered as well)."""
    from swagger_ui_bundle import swagger_ui_path

    openapi_url = app.openapi_url or "/openapi.json"
    title = f"{app.title} - Swagger UI"
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_path), name="swagger-ui-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )
