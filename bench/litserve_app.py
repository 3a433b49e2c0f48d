"""The LitServe peer of the service benchmark: the same model file served by LitServe in its usual CPU
set-up, ``LitServer(api, accelerator="cpu", workers_per_device=2)`` with each worker's session on one
thread (``bench.engine_session``), decoding, pre- and post-processing in the worker as LitServe does
(``decode_request`` -> ``predict`` -> ``encode_response``).

    python -m bench.litserve_app --model cache/int8.onnx --runtime onnxruntime --port 8101

``POST /detect`` takes the JPEG as the raw body and answers as ``bench.naive_app`` does; ``GET /readyz``
(LitServe's health check) answers 200 once every worker has loaded its model; ``GET /v1/model`` says
what runs. SIGTERM stops the server and its worker processes.

(No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s annotation to type
its endpoint's parameter, and needs the object, not a string.)
"""

import argparse
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Body
from torch import Tensor

from bench.engine_session import RUNTIMES, default_runtime, open_session
from bench.naive_app import decode, detections_json
from model.postprocess import PostProcessor
from model.preprocess import preprocess

DEFAULT_WORKERS = 2  # per device (the CPU): LitServe's usual CPU set-up, one worker per core here


class DetectAPI(ls.LitAPI):
    """``model`` on ``runtime`` with ``threads`` threads per worker, answering as ``bench.naive_app``."""

    def __init__(self, model: Path, runtime: str, threads: int = 1) -> None:
        super().__init__(api_path="/detect")
        self.model, self.runtime, self.threads = model, runtime, threads

    def setup(self, device: str) -> None:
        self.session = open_session(self.model, self.runtime, self.threads)
        self.postprocessor = PostProcessor(self.session.config)

    def decode_request(self, request: Annotated[bytes, Body(media_type="image/jpeg")]) -> Tensor:
        return decode(request)

    def predict(self, pixels: Tensor) -> dict[str, Any]:
        config = self.session.config
        height, width = pixels.shape[1:]
        x = preprocess([pixels], config.input_size, config.normalization)
        with torch.inference_mode():
            outputs = self.session(x)
            return detections_json(config, self.postprocessor, outputs, self.session.anchors, (width, height))

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def make_server(model: Path, runtime: str, workers: int = DEFAULT_WORKERS, threads: int = 1) -> Any:
    info = {"backend": runtime, "precision": _precision(model, runtime), "device": "cpu"}
    server = ls.LitServer(
        DetectAPI(model, runtime, threads), accelerator="cpu", workers_per_device=workers,
        healthcheck_path="/readyz", info_path="/litserve-info", model_metadata=info,
    )  # fmt: skip

    @server.app.get("/v1/model")
    def model_info() -> dict[str, str]:
        return info

    return server


def _precision(model: Path, runtime: str) -> str:
    if runtime == "torch":
        return "fp32"
    from model.artifacts import read_manifest

    return read_manifest(model, verify_hash=False).precision


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # LitServer.run stops its workers on KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.litserve_app", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, type=Path, help="checkpoint (.pth, .pth.xz) or ONNX model (.onnx)"
    )
    p.add_argument(
        "--runtime", choices=RUNTIMES, help="default: torch for a checkpoint, onnxruntime for ONNX"
    )
    p.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="LitServe workers on the CPU (default 2)"
    )
    p.add_argument("--threads", type=int, default=1, help="each worker session's threads (default 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    args = p.parse_args(argv)
    runtime = args.runtime or default_runtime(args.model)
    server = make_server(args.model, runtime, args.workers, args.threads)
    signal.signal(signal.SIGTERM, _interrupt)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
