"""Phase ``oip``: issue #25's findings 3 and 6 against a real ``refinedet serve``.

- ``malformed``: each hostile body of finding 3 posted to ``/v2/models/{name}/infer`` on a keep-alive
  connection, then ``GET /healthz`` on the same connection: the status, whether the error is the protocol's
  ``{"error": "<message>"}``, whether the connection stayed open, the seconds to the answer.
- ``upgrade``: WebSocket upgrades (finding 6): the status and whether the answer is the service's JSON.
- ``flood``: ``/detect`` answers from ``DETECT_CLIENTS`` closed-loop clients (a BCCD JPEG) and the latency of
  ``GET /healthz`` sampled every 100 ms, in three windows: alone, while ``FLOOD_CLIENTS`` anonymous clients
  post the 16.5 MB body of 3.3 M empty strings over and over (from threads, blocking sockets), alone again:
  the ratio of ``/detect`` answers under the flood to the mean of the two others (the machine is shared),
  the ``/healthz`` latency, the server's CPU seconds, and the flood's statuses and time to its answer.

ok when nothing is answered 5xx or left unanswered, every error is in its path's shape (the protocol's under
``/v2``, the service's ``{"error": {"code", "message"}}`` elsewhere), every connection survives its
4xx, and ``/detect`` keeps at least half its answers under the flood.

    python -m bench.attacks --phases oip --port 18350 --out /tmp/attacks/attacks.json
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import statistics
import threading
import time
from collections import Counter
from typing import Any

from bench.attacks import Context
from bench.soak import BCCD_IMAGE, HOST, ServerProcess, http, process_cpu_s

NAME = "oip"
HELP = "OIP v2 infer: malformed bodies, a WebSocket upgrade, a 16.5 MB flood of empty strings (#25: 3, 6)"
DETECT_CLIENTS = 4
FLOOD_CLIENTS = 2
WINDOW_S = 20.0
FLOOD_ELEMENTS = 3_300_000
MIN_DETECT_RATIO = 0.5


def nested(depth: int) -> bytes:
    return b"[" * depth + b'"x"' + b"]" * depth


def malformed_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    """Finding 3's bodies: what -> (body, extra headers)."""
    big = b"1" + b"0" * 4301
    image = base64.b64encode(b"\xff\xd8\xff").decode()

    def request(tensor: dict[str, Any] | None = None, **top: Any) -> bytes:
        base = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}
        return json.dumps({"inputs": [{**base, **(tensor or {})}], **top}).encode()

    tensor = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":%s}]}'
    return {
        "data nested 600 deep": (tensor % nested(600), {}),
        "JSON nested 1000 deep": (b'{"inputs":[],"x":%s}' % nested(1000), {}),
        "4302-digit shape": (request(shape=[0]).replace(b"[0]", b"[%s]" % big), {}),
        "4302-digit max_detections": (
            request(parameters={"max_detections": 0}).replace(b": 0}", b": %s}" % big),
            {},
        ),
        "tensor parameters a list": (request({"parameters": [1]}), {}),
        "output name a list": (request(outputs=[{"name": ["boxes"]}]), {}),
        "output name a dict": (request(outputs=[{"name": {"a": 1}}]), {}),
        "output parameters a string": (request(outputs=[{"name": "boxes", "parameters": "x"}]), {}),
        "length header a non-ASCII digit": (request(), {"Inference-Header-Content-Length": "\u00b2"}),
        "length header 4302 digits": (request(), {"Inference-Header-Content-Length": big.decode()}),
        "NaN threshold": (request(parameters={"score_threshold": float("nan")}), {}),
    }


def flood_body() -> bytes:
    head = b'{"inputs":[{"name":"image","shape":[%d],"datatype":"BYTES","data":[' % FLOOD_ELEMENTS
    return head + b",  ".join([b'""'] * FLOOD_ELEMENTS) + b"]}]}"  # 5 bytes an element: 16.5 MB


def exchange(port: int, requests: list[bytes], timeout_s: float = 60.0) -> list[tuple[int, dict, bytes]]:
    """``requests`` one after another on one connection: (status, headers, body) of each answer; status 0
    for each left unanswered (the connection closed or timed out)."""
    answers: list[tuple[int, dict, bytes]] = []
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        stream = sock.makefile("rb")
        for raw in requests:
            try:
                sock.sendall(raw)
                status_line = stream.readline()
                headers = {}
                while (line := stream.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = stream.read(int(headers.get("content-length", 0)))
                answers.append((int(status_line.split()[1]), headers, body))
            except (OSError, IndexError, ValueError):
                answers.append((0, {}, b""))
    return answers + [(0, {}, b"")] * (len(requests) - len(answers))


def raw_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = {"Host": HOST, "Content-Length": str(len(body)), **(headers or {})}
    lines = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return lines.encode("latin-1") + b"\r\n" + body


def shape_of(body: bytes) -> str:
    """'oip' ({"error": str}), 'service' ({"error": {"code", "message"}}), or 'other'."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return "other"
    if isinstance(error, str):
        return "oip"
    return "service" if isinstance(error, dict) and {"code", "message"} <= set(error) else "other"


def phase_malformed(port: int, model: str) -> dict[str, Any]:
    rows = {}
    for what, (body, headers) in malformed_bodies().items():
        start = time.perf_counter()
        post = raw_request(
            "POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json", **headers}
        )
        (status, _, answer), (after, _, _) = exchange(port, [post, raw_request("GET", "/healthz")])
        rows[what] = {"status": status, "shape": shape_of(answer), "kept_open": after == 200,
                      "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    return rows


def phase_upgrade(port: int) -> dict[str, Any]:
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    rows = {}
    for path in ("/ws", "/healthz"):
        (status, headers, body), (after, _, _) = exchange(
            port, [raw_request("GET", path, headers=upgrade), raw_request("GET", "/healthz")]
        )
        rows[path] = {"status": status, "content_type": headers.get("content-type"),
                      "shape": shape_of(body) if status >= 400 else "json" if body[:1] == b"{" else "other",
                      "kept_open": after == 200}  # fmt: skip
    return rows


def flood_client(port: int, model: str, body: bytes, until: float, answers: list) -> None:
    request = raw_request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
    while time.monotonic() < until:
        start = time.perf_counter()
        status, _, answer = exchange(port, [request], timeout_s=120)[0]
        answers.append((status, shape_of(answer), time.perf_counter() - start))


async def measure(port: int, image: bytes, window_s: float) -> dict[str, Any]:
    """``/detect`` answers from ``DETECT_CLIENTS`` closed-loop clients over ``window_s``, and /healthz
    latency sampled every 100 ms meanwhile."""
    until = time.monotonic() + window_s
    detect: Counter[int] = Counter()
    healthz: list[float] = []

    async def detect_client() -> None:
        while time.monotonic() < until:
            status, *_ = await http(port, "POST", "/detect", image, {"Content-Type": "image/jpeg"})
            detect[status] += 1 if time.monotonic() <= until else 0

    async def probe() -> None:
        while time.monotonic() < until:
            status, _, _, seconds = await http(port, "GET", "/healthz")
            healthz.append(seconds if status == 200 else float("inf"))
            await asyncio.sleep(0.1)

    await asyncio.gather(probe(), *(detect_client() for _ in range(DETECT_CLIENTS)))
    return {"detect_200": detect[200], "detect_statuses": {str(k): v for k, v in sorted(detect.items())},
            "healthz_ms": quantiles(healthz)}  # fmt: skip


def quantiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(seconds)
    at = min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    return {"p50": round(statistics.median(ordered) * 1e3, 1), "p99": round(ordered[at] * 1e3, 1),
            "max": round(ordered[-1] * 1e3, 1)}  # fmt: skip


def phase_flood(server: ServerProcess, model: str, window_s: float) -> dict[str, Any]:
    """/detect alone, under the flood, alone again (the machine is shared: the flood is compared with the
    mean of the windows around it); the server's CPU seconds in each window."""
    port, image, body = server.port, BCCD_IMAGE.read_bytes(), flood_body()

    def window(flood: bool) -> dict[str, Any]:
        answers: list[tuple[int, str, float]] = []
        until = time.monotonic() + window_s
        threads = [
            threading.Thread(target=flood_client, args=(port, model, body, until, answers), daemon=True)
            for _ in range(FLOOD_CLIENTS if flood else 0)
        ]
        cpu = process_cpu_s(server.proc.pid)
        for thread in threads:
            thread.start()
        measured = asyncio.run(measure(port, image, window_s))
        for thread in threads:
            thread.join(timeout=180)
        measured["server_cpu_s"] = round(process_cpu_s(server.proc.pid) - cpu, 2)
        if flood:
            measured["flood"] = {
                "answers": len(answers),
                "statuses": dict(Counter(str(s) for s, _, _ in answers)),
                "shapes": dict(Counter(shape for _, shape, _ in answers)),
                "answer_ms": quantiles([s for *_, s in answers]),
            }
        return measured

    before, flooded, after = window(False), window(True), window(False)
    alone = (before["detect_200"] + after["detect_200"]) / 2
    return {
        "body_mb": round(len(body) / 1e6, 1),
        "window_s": window_s,
        "alone_before": before,
        "flooded": flooded,
        "alone_after": after,
        "detect_ratio": round(flooded["detect_200"] / max(alone, 1), 3),
    }


def run(ctx: Context) -> dict[str, Any]:
    window_s = 5.0 if ctx.quick else WINDOW_S
    server = ServerProcess(ctx.port, ctx.env, ctx.work_dir / "server.log")
    try:
        server.wait_ready()
        model = json.loads(exchange(ctx.port, [raw_request("GET", "/v1/model")])[0][2])["name"]
        malformed = phase_malformed(ctx.port, model)
        upgrade = phase_upgrade(ctx.port)
        flood = phase_flood(server, model, window_s)
    finally:
        server.stop()
    tracebacks = (ctx.work_dir / "server.log").read_text().count("Traceback")
    bad = [
        w
        for w, r in malformed.items()
        if not (400 <= r["status"] < 500 and r["shape"] == "oip" and r["kept_open"])
    ]
    bad += [f"upgrade {p}" for p, r in upgrade.items() if r["status"] in (0, 403) or r["status"] >= 500
            or r["shape"] not in ("service", "json") or not r["kept_open"]]  # fmt: skip
    answered = flood["flooded"]["flood"]
    flood_ok = answered["answers"] > 0 and set(answered["statuses"]) == {"413"}
    flood_ok = flood_ok and set(answered["shapes"]) == {"oip"} and flood["detect_ratio"] >= MIN_DETECT_RATIO
    return {
        "ok": not bad and flood_ok and not tracebacks,
        "failed": bad,
        "server_tracebacks": tracebacks,
        "malformed": malformed,
        "upgrade": upgrade,
        "flood": flood,
    }
