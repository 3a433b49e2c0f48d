"""What the service adds per request around the network: the same /detect served twice with an instant
network (its outputs for a real photo, computed once at start-up and returned for every call), so that
only the request path is left to time, one client at a time, keep-alive, the photo as the raw body:

- ``service``: ``create_app`` through ``service.server``'s uvicorn options (our HTTP protocol, the
  middleware, admission, the batcher's engine slot, metrics, Server-Timing), the JPEG decoded in the
  engine slot, the shared pre- and post-processing;
- ``minimal``: a sync FastAPI handler doing the same decode, pre- and post-processing and JSON
  (``bench.naive_app``'s), on plain uvicorn.

The difference is the service's own per-request cost.

    python -m bench.service_overhead --cpu-engine auto --requests 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.common import find_jpegs, format_table, read_jpegs, resolve_checkpoint
from bench.request_path import over_http
from model.errors import UserError


def instant(backend: Any, jpeg: bytes) -> Any:
    """``backend`` whose ``infer`` returns its outputs for ``jpeg``, computed once (no network per call)."""
    from model.preprocess import preprocess
    from service.imaging import decode_pixels

    config = backend.loaded_config
    outputs = backend.infer(preprocess([decode_pixels(jpeg)], config.input_size, config.normalization))
    backend.infer = lambda images: outputs
    backend.single_thread_infer = lambda: backend.infer
    return backend


def serve(args: argparse.Namespace) -> None:
    """The server side (a subprocess of the measurement): ``args.app`` on ``args.port``."""
    import uvicorn

    from bench.common import service_backend
    from service.process import prepare_process
    from service.settings import Settings

    prepare_process()
    jpeg = Path(args.photo).read_bytes()
    settings = Settings(model=args.model, backend=args.backend, device="cpu", host=servers.HOST, port=args.port,
                        access_log=False)  # fmt: skip
    built, plan = service_backend(settings)
    built.load()
    backend = instant(built, jpeg)
    if args.app == "service":
        from service.app import create_app
        from service.server import uvicorn_options

        uvicorn.run(
            create_app(settings, loader=lambda _: backend, plan=plan),
            **uvicorn_options(settings, json_logs=False),
        )
        return
    uvicorn.run(
        minimal_app(backend), host=servers.HOST, port=args.port, log_level="warning", access_log=False
    )


def minimal_app(backend: Any) -> Any:
    import torch
    from fastapi import Body, FastAPI

    from bench.naive_app import decode, detections_json
    from model.postprocess import PostProcessor
    from model.preprocess import preprocess

    config = backend.loaded_config
    postprocessor = PostProcessor(config)
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/detect")
    def detect(body: bytes = Body(..., media_type="image/jpeg")) -> dict[str, Any]:
        pixels = decode(body)
        x = preprocess([pixels], config.input_size, config.normalization)
        with torch.inference_mode():
            size = (int(pixels.shape[2]), int(pixels.shape[1]))
            return detections_json(config, postprocessor, backend.infer(x), backend.anchors, size)

    return app


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.service_bench import service_model

    checkpoint = resolve_checkpoint(args.model, Path("."))
    served, backend = service_model(args, checkpoint)
    jpegs = read_jpegs(find_jpegs(args.images, limit=1))
    rows = []
    for app in ("service", "minimal"):
        photo = find_jpegs(args.images, limit=1)[0]
        argv = [sys.executable, "-m", "bench.service_overhead", "--serve", app, "--model", str(served),
                "--backend", backend or "auto", "--photo", str(photo), "--port", "{port}"]  # fmt: skip
        env = servers.server_env({"REFINEDET_LOG_LEVEL": "warning"})
        with servers.running(argv, env, Path(args.log_dir) / f"overhead_{app}.log", 300) as url:
            for row in over_http(url, jpegs, args.requests):
                rows.append({"app": app, **row})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.service_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: the shipped one)")
    p.add_argument("--cpu-engine", choices=["auto", "int8", "fp32", "torch"], default="auto")
    p.add_argument("--cache-dir", type=Path, help="--cpu-engine's cache (default REFINEDET_CACHE_DIR)")
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--images", action="append", default=[], help="the JPEG to send (default: a BCCD photo)")
    p.add_argument("--requests", type=int, default=200, help="requests per app (default 200)")
    p.add_argument("--log-dir", default="/tmp", help="server logs here (default /tmp)")
    p.add_argument("--serve", choices=["service", "minimal"], help=argparse.SUPPRESS)
    p.add_argument("--photo", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        args.app = args.serve
        serve(args)
        return 0
    try:
        start = time.perf_counter()
        rows = measure(args)
    except UserError as exc:
        print(f"service_overhead: error: {exc}", file=sys.stderr)
        return 2
    print(
        format_table(rows, (("app", "app"), ("stage", "stage"), ("p50_ms", "p50 ms"), ("mean_ms", "mean ms")))
    )
    latency = {r["app"]: r["p50_ms"] for r in rows if r["stage"] == "HTTP /detect, client latency"}
    if len(latency) == 2:
        print(f"the service's own cost per request (p50): {latency['service'] - latency['minimal']:.2f} ms "
              f"({latency['service']:.2f} vs {latency['minimal']:.2f}); measured in {time.perf_counter() - start:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
