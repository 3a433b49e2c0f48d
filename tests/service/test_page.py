"""The page at ``/`` and the static files behind it and ``/docs``, without a browser (test_browser.py
drives one): the HTML carries the settings the script needs, every asset comes from this server, the
script draws in the annotated image's colours, and asset requests are counted under their folder in
/metrics, never as ``unmatched``."""

from __future__ import annotations

import json
import re

from service_testing import running, settings, standin_loader

from model.drawing import PALETTE
from service.app import create_app
from service.docs_ui import ASSETS, swagger_ui_folder
from service.routes.page import static_folder


def page_config(html: str) -> dict:
    found = re.search(r'<script id="page-config" type="application/json">(.*?)</script>', html, re.S)
    assert found, "the page has no config"
    return json.loads(found.group(1))


def test_page_is_served_with_its_settings_and_local_assets():
    with running(create_app(settings(default_score_threshold=0.4), loader=standin_loader())) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page_config(page.text) == {"apiKeyHeader": None, "scoreThreshold": 0.4, "maxDetections": 100}
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        # relative: from this server, also behind a proxy's path prefix; nothing from outside
        assert {"ui/app.js", "ui/app.css", "docs", "metrics"} <= set(urls)
        assert not [u for u in urls if (":" in u and not u.startswith("data:")) or u.startswith("//")], urls
        for asset in ("/ui/app.js", "/ui/app.css"):
            assert client.get(asset).status_code == 200
        assert client.get("/ui/missing.js").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not an API operation


def test_page_asks_for_the_key_only_when_the_server_has_one():
    app = create_app(settings(api_key="sesame", api_key_header="X-Key"), loader=standin_loader())
    with running(app) as client:
        assert page_config(client.get("/").text)["apiKeyHeader"] == "X-Key"
        assert "sesame" not in client.get("/").text
        assert client.get("/ui/app.js").status_code == 200  # the page's files need no key


def test_asset_requests_are_counted_under_their_folder():
    with running(create_app(settings(), loader=standin_loader())) as client:
        for path in ("/", "/ui/app.js", "/ui/nothing.css", "/docs", "/docs/assets/swagger-ui.css"):
            client.get(path)
        text = client.get("/metrics").text
    counted = dict(
        re.findall(r'refinedet_http_requests_total\{method="GET",route="([^"]+)",status="(\d+)"', text)
    )
    assert counted["/ui/{path}"] in ("200", "404") and counted["/docs/assets/{path}"] == "200"
    assert counted["/"] == "200" and counted["/docs"] == "200"
    assert "unmatched" not in counted


def test_the_page_draws_in_the_annotated_image_colours():
    script = (static_folder() / "app.js").read_text()
    found = re.search(r"const PALETTE = (\[.*?\]);", script)
    assert found and [tuple(c) for c in json.loads(found.group(1))] == list(PALETTE)


def test_docs_ship_a_swagger_ui_that_reads_openapi_3_1():
    """Swagger UI 4 shows "Unable to render this definition" for FastAPI's OpenAPI 3.1; the bundle served
    must be 5.x (test_browser.py checks the rendering itself where Chromium is installed)."""
    folder = swagger_ui_folder()
    assert all((folder / name).is_file() for name in ASSETS)
    bundle = (folder / "swagger-ui-bundle.js").read_text(encoding="utf-8", errors="replace")
    found = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle)
    assert found and int(found.group(1)) >= 5, found
