"""scripts/container_probe.py (the HTTP checks of scripts/container_check.sh) against a stand-in server:
it passes a sensible answer and fails wrong classes, a missed WBC, an absurd count or an error status."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "scripts" / "container_probe.py"
ANNOTATION = """<annotation>{}</annotation>""".format(
    "".join(f"<object><name>{n}</name></object>" for n in ["RBC"] * 10 + ["WBC"])
)


def reply(labels: list[str], backend: str = "onnxruntime") -> dict:
    box = {"x1": 0, "y1": 0, "x2": 1, "y2": 1}
    return {
        "detections": [{"label": n, "class_id": 0, "score": 0.9, "box": box} for n in labels],
        "image": {"width": 640, "height": 480},
        "model": {"name": "m", "backend": backend, "device": "cpu", "precision": "fp32"},
        "timings_ms": {"total": 12.0},
    }


class StandIn(BaseHTTPRequestHandler):
    answer: tuple[int, dict] = (200, {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        data = b"ok" if self.path == "/readyz" else b"refinedet_http_requests_in_flight 3.0\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def photo(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "a.xml").write_text(ANNOTATION)
    return str(tmp_path / "a.jpg"), str(tmp_path / "a.xml")


@pytest.mark.parametrize(
    ("status", "labels", "verdict"),
    [
        (200, ["RBC"] * 9 + ["WBC", "Platelets"], "detected 11"),
        (200, ["RBC"] * 9 + ["WBC", "Cat"], "unknown classes"),
        (200, ["RBC"] * 10, "white blood cell was missed"),
        (200, ["RBC"] * 40 + ["WBC"], "RBC count far"),
        (503, [], "answered 503"),
    ],
)
def test_detect_check(server: str, photo: tuple[str, str], status: int, labels: list[str], verdict: str):
    StandIn.answer = (status, reply(labels))
    done = probe("detect", server, *photo)
    assert verdict in done.stdout
    assert (done.returncode == 0) == (verdict == "detected 11"), done.stdout


def test_detect_check_wants_the_cpu_engine(server: str, photo: tuple[str, str]):
    """The default CPU start must serve the CPU engine (OpenVINO or ONNX Runtime): a silent fallback to torch
    fails the check."""
    StandIn.answer = (200, reply(["RBC"] * 9 + ["WBC"], backend="torch"))
    done = probe("detect", server, *photo, "openvino|onnxruntime")
    assert done.returncode != 0 and "served by torch, expected openvino|onnxruntime" in done.stdout
    for backend in ("onnxruntime", "openvino"):
        StandIn.answer = (200, reply(["RBC"] * 9 + ["WBC"], backend=backend))
        assert probe("detect", server, *photo, "openvino|onnxruntime").returncode == 0


def test_ready_and_in_flight(server: str):
    assert probe("ready", server, "5").returncode == 0
    assert "2 requests in flight" in probe("in-flight", server, "2", "5").stdout
    assert probe("in-flight", server, "3", "0.5").returncode == 1  # 3 in flight include /metrics itself
