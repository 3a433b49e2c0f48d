"""``/``: a page for people to try the detector in a browser; its script and stylesheet under ``/ui``.

Plain HTML, JavaScript and CSS from ``service/static`` (no build step, nothing from a CDN). The page sends
the chosen image (or webcam frames) to ``POST /detect`` once with ``score_threshold=0`` and draws what the API
returned on a canvas; the threshold slider and the class filter then re-filter those detections in the
browser (``score > threshold``, as the API), so they answer at once. Stage times come from the response's
``Server-Timing`` header. The settings the page needs (API key header, default threshold, detection cap)
are written into the HTML once, when the app is built.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.settings import Settings

PAGE_PATH = "/"
ASSETS_PATH = "/ui"
CONFIG_MARK = "{{PAGE_CONFIG}}"


def static_folder() -> Path:
    return Path(str(files("service") / "static"))


def page_config(settings: Settings) -> dict[str, object]:
    """What the page's script reads from the HTML: the API key header (``None`` when no key is needed),
    the default score threshold and the detection cap."""
    return {
        "apiKeyHeader": settings.api_key_header if settings.api_key is not None else None,
        "scoreThreshold": settings.default_score_threshold,
        "maxDetections": settings.max_detections,
    }


def render_page(settings: Settings) -> str:
    html = (static_folder() / "index.html").read_text(encoding="utf-8")
    config = json.dumps(page_config(settings)).replace("<", "\\u003c")  # cannot close the <script>
    if CONFIG_MARK not in html:
        raise RuntimeError(f"service/static/index.html lacks its {CONFIG_MARK} mark")
    return html.replace(CONFIG_MARK, config)


def install_page(app: FastAPI, settings: Settings) -> None:
    """Serve the page at ``/`` and its assets under ``/ui``."""
    html = render_page(settings)
    app.mount(ASSETS_PATH, StaticFiles(directory=static_folder()), name="page-assets")
    api = APIRouter()

    @api.get(PAGE_PATH, include_in_schema=False, response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    app.include_router(api)
