"""Latency of one image through ``POST /detect`` and through ``POST /v2/models/{name}/infer`` (tritonclient,
binary tensors) on the same server: what the Open Inference Protocol envelope costs.

    python -m bench.oip_overhead [--model PATH] [--requests 200] [--port 18310]

Sequential requests from one client to a uvicorn server on 127.0.0.1 (in this process's threads), the two
routes interleaved so that machine load hits both alike; prints p50/p90 per route as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time

import httpx
import numpy as np


def main() -> None:
    import uvicorn
    from PIL import Image
    from tritonclient import http as triton_http

    from deploy.prepare import prepare
    from service.app import create_app
    from service.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--port", type=int, default=18310)
    args = parser.parse_args()
    settings = Settings(model=args.model, device="cpu", access_log=False, log_level="warning")
    app = create_app(settings, plan=prepare(settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out, format="JPEG")
    image = out.getvalue()
    client = httpx.Client(base_url=url, timeout=60)
    name = client.get("/v1/model").json()["name"]
    triton = triton_http.InferenceServerClient(f"127.0.0.1:{args.port}")
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))

    def detect() -> None:
        r = client.post("/detect", content=image, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200

    def infer() -> None:
        triton.infer(name, [tensor])

    times: dict[str, list[float]] = {"detect": [], "v2_infer": []}
    for _ in range(5):
        detect(), infer()
    for _ in range(args.requests):
        for key, call in (("detect", detect), ("v2_infer", infer)):
            start = time.perf_counter()
            call()
            times[key].append((time.perf_counter() - start) * 1e3)
    report = {
        key: {
            "p50_ms": round(statistics.median(v), 2),
            "p90_ms": round(sorted(v)[int(0.9 * len(v))], 2),
            "n": len(v),
        }
        for key, v in times.items()
    }
    print(json.dumps({"model": name, "image": "640x480 JPEG", **report}, indent=2))
    server.should_exit = True


if __name__ == "__main__":
    main()
