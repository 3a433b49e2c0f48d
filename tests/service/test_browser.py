"""What a person sees, in a real headless Chromium (``browser`` marker; ``tests/browser.py`` drives it).

- ``/docs``: Swagger UI renders the OpenAPI 3.1 schema and lists every operation.
- ``/``: a BCCD photo chosen (or dropped) in the page is sent to ``POST /detect`` and the boxes drawn are exactly those
  the API returns for the same file at the slider's threshold and the ticked classes; the webcam mode
  (Chromium's synthetic camera) runs frame after frame and shows its rate; a key-protected server asks
  for the key.

The engine is the stand-in network (``service_testing.StandInBackend``): its scores spread over 0.3-0.8 on
any photo, so the threshold and the class filter have something to remove.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import Page, chromium
from service_testing import serving, settings, standin_loader

from service.app import create_app

pytestmark = pytest.mark.browser
DRAWN_ROWS = """JSON.stringify([...document.querySelectorAll('#detections tbody tr')].map(r => ({
    label: r.dataset.label, score: Number(r.dataset.score),
    box: [r.dataset.x1, r.dataset.y1, r.dataset.x2, r.dataset.y2].map(Number)})))"""
DONE = "document.body.dataset.state === 'done'"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(create_app(settings(), loader=standin_loader())) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Page]:
    with chromium() as page:
        yield page


@pytest.fixture
def photo(bccd: Path) -> Path:
    return bccd / "JPEGImages" / "BloodImage_00000.jpg"


def test_docs_render_every_operation(server, browser):
    browser.goto(f"{server}/docs")
    browser.wait_for("document.querySelectorAll('.opblock').length > 0", what="Swagger UI's operations")
    shown = browser.evaluate(
        """[...document.querySelectorAll('.opblock-summary')].map(s =>
            s.querySelector('.opblock-summary-method').textContent + ' ' +
            s.querySelector('.opblock-summary-path').dataset.path)"""
    )
    schema = httpx.get(f"{server}/openapi.json").json()
    expected = {f"{m.upper()} {p}" for p, ops in schema["paths"].items() for m in ops}
    assert {"POST /detect", "POST /detect/batch", "GET /v1/model"} <= expected
    assert set(shown) == expected
    assert "Unable to render" not in browser.evaluate("document.body.innerText")


def drawn(page: Page) -> list[dict]:
    return json.loads(page.evaluate(DRAWN_ROWS))


def api_detections(
    server: str, photo: Path, threshold: float, classes: list[str] | None = None
) -> list[dict]:
    params: dict = {"score_threshold": threshold, **({"classes": ",".join(classes)} if classes else {})}
    r = httpx.post(f"{server}/detect", params=params, files={"file": (photo.name, photo.read_bytes())})
    assert r.status_code == 200, r.text
    return [
        {"label": d["label"], "score": d["score"], "box": [d["box"][k] for k in ("x1", "y1", "x2", "y2")]}
        for d in r.json()["detections"]
    ]


def set_threshold(page: Page, value: float) -> None:
    page.evaluate(
        f"(s => {{ s.value = '{value}'; s.dispatchEvent(new Event('input')); }})(document.getElementById('threshold'))"
    )


def test_page_draws_the_boxes_the_api_returned(server, browser, photo):
    browser.goto(f"{server}/")
    browser.wait_for("document.querySelectorAll('#classes input').length === 2", what="the class filter")
    browser.set_files("#file", photo)
    browser.wait_for(DONE, what="the detections")
    at_default = drawn(browser)
    assert at_default == api_detections(server, photo, 0.5)
    assert browser.evaluate("Number(document.getElementById('count').dataset.drawn)") == len(at_default)
    stages = browser.evaluate("[...document.querySelectorAll('#timings .t-row')].map(r => r.dataset.stage)")
    assert stages == ["decode", "preprocess", "queue", "inference", "postprocess", "total"]

    set_threshold(browser, 0.6)  # filtered in the page, no new request
    at_06 = drawn(browser)
    assert at_06 == api_detections(server, photo, 0.6) and 0 < len(at_06) < len(at_default)

    browser.evaluate("document.querySelector('#classes input[data-class-id=\"0\"]').click()")  # untick "a"
    only_b = drawn(browser)
    assert only_b == api_detections(server, photo, 0.6, ["b"]) and 0 < len(only_b) < len(at_06)
    canvas = browser.evaluate(
        "[document.getElementById('canvas').width, document.getElementById('canvas').height]"
    )
    assert canvas == [640, 480]
    assert browser.console == []


def test_page_takes_a_dropped_photo(server, browser, bccd):
    dropped = bccd / "JPEGImages" / "BloodImage_00003.jpg"
    browser.goto(f"{server}/")
    browser.drop_files("#stage", dropped)
    browser.wait_for(DONE, what="the detections")
    assert browser.evaluate("document.getElementById('summary').textContent").startswith(dropped.name)
    boxes = drawn(browser)
    assert boxes and boxes == api_detections(server, dropped, 0.5)


def test_page_reports_a_bad_file_in_one_line(server, browser, tmp_path):
    browser.goto(f"{server}/")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    browser.set_files("#file", text)
    browser.wait_for("document.body.dataset.state === 'error'", what="the error")
    message = browser.evaluate("document.getElementById('error').textContent")
    answer = httpx.post(f"{server}/detect", files={"file": (text.name, text.read_bytes())})
    assert answer.status_code == 400 and message == answer.json()["error"]["message"]  # the API's own line


def test_webcam_mode_detects_frame_after_frame(server, browser):
    browser.goto(f"{server}/")
    browser.evaluate("document.getElementById('webcam').click()")
    rate = browser.wait_for(
        "(t => /^[0-9.]+ FPS$/.test(t) && t)(document.getElementById('fps').textContent)", what="a frame rate"
    )
    assert float(rate.split()[0]) > 0
    assert browser.evaluate(DONE) and browser.evaluate(
        "document.getElementById('summary').textContent"
    ).startswith("webcam")
    browser.evaluate("document.getElementById('webcam').click()")
    assert browser.evaluate("document.getElementById('webcam').textContent") == "Start webcam"


def test_page_asks_for_the_key_a_server_needs(browser, photo):
    app = create_app(settings(api_key="sesame"), loader=standin_loader())
    with serving(app) as (url, _):
        browser.goto(f"{url}/")
        assert browser.evaluate("document.getElementById('key-card').hidden") is False
        browser.set_files("#file", photo)
        browser.wait_for("document.body.dataset.state === 'error'", what="the refusal")
        assert "API key" in browser.evaluate("document.getElementById('error').textContent")
        browser.evaluate(
            "(k => { k.value = 'sesame'; k.dispatchEvent(new Event('change')); })(document.getElementById('api-key'))"
        )
        browser.set_files("#file", photo)
        browser.wait_for(DONE, what="the detections")
        assert drawn(browser)


@pytest.mark.slow
def test_page_with_the_shipped_model_draws_the_cells_it_finds(browser, photo, tmp_path):
    """The shipped model (torch backend, ~15 s to load on 2 cores): the page draws what the API finds on a
    BCCD photo, the white cell in the middle of BloodImage_00000 among it."""
    with serving(create_app(settings(backend="torch"))) as (url, _):
        browser.goto(f"{url}/")
        browser.wait_for("document.querySelectorAll('#classes input').length === 3", what="the class filter")
        browser.set_files("#file", photo)
        browser.wait_for(DONE, timeout_s=60, what="the detections")
        boxes = drawn(browser)
        assert boxes == api_detections(url, photo, 0.5)
        assert {"RBC", "WBC"} <= {b["label"] for b in boxes} and len(boxes) >= 10
        browser.screenshot(tmp_path / "page.png")  # kept by pytest's tmp_path for a look after a failure
