"""The naive peer the service benchmark compares with: a minimal FastAPI app as a user would first write
it. One session of the model file (``bench.engine_session``: ONNX Runtime or OpenVINO for an ONNX model,
eager PyTorch for a checkpoint, on the CPU; a checkpoint may also run on CUDA), a sync endpoint (so
FastAPI runs requests on its thread pool), PIL decode, the shared ``model.preprocess`` /
``model.postprocess``. No batching, no admission, no thread sharing.

    python -m bench.naive_app --model cache/int8.onnx --runtime openvino --port 8100
    python -m bench.naive_app --model model/checkpoints/refinedet320_vgg16_bccd.pth.xz --device cuda

``POST /detect`` takes the JPEG as the raw body (``Content-Type: image/jpeg``) and answers
``{"image": {"width", "height"}, "detections": [{"label", "score", "box": [x1, y1, x2, y2]}]}``;
``GET /readyz`` answers 200 (the model is loaded before the server starts); ``GET /v1/model`` says what
runs (the benchmark labels its rows with it).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import Body, FastAPI, HTTPException
from torch import Tensor

from bench.engine_session import RUNTIMES, default_runtime, open_session
from model.config import RefineDetConfig
from model.postprocess import ModelOutput, PostProcessor, to_pixels
from model.preprocess import pil_to_rgb, preprocess

SCORE_THRESHOLD = 0.5  # the service's default_score_threshold


def detections_json(
    config: RefineDetConfig,
    postprocessor: PostProcessor,
    outputs: ModelOutput,
    anchors: Tensor,
    size: tuple[int, int],
) -> dict[str, Any]:
    """The answer for one image of ``size`` (width, height): shared post-processing, boxes in its pixels."""
    detections = postprocessor(outputs, anchors).to("cpu")
    boxes, scores, labels = detections.image(0, SCORE_THRESHOLD)
    boxes = to_pixels(boxes, *size)
    return {
        "image": {"width": size[0], "height": size[1]},
        "detections": [
            {"label": config.class_names[int(c) - 1], "score": round(float(s), 4),
             "box": [round(float(v), 1) for v in b]}
            for b, s, c in zip(boxes, scores, labels, strict=True)
        ],
    }  # fmt: skip


def decode(body: bytes) -> Tensor:
    """uint8 RGB Tensor[3, H, W] of a JPEG body (PIL); 400 if it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body)) as im:
            return pil_to_rgb(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise HTTPException(400, f"not an image: {exc}") from None


def _network(
    model: Path, device: str, runtime: str | None, threads: int | None
) -> tuple[Callable[[Tensor], ModelOutput], RefineDetConfig, Tensor, dict[str, str]]:
    """(network, config, anchors, what /v1/model reports) for the model file."""
    if device == "cuda":  # the checkpoint on the GPU, as the first naive baseline did
        from model.checkpoint import load_model

        net, _ = load_model(model, map_location=device)
        net.requires_grad_(False)
        info = {"backend": "torch", "precision": "fp32", "device": device}
        return net, net.config, net.anchors, info  # type: ignore[return-value]
    session = open_session(model, runtime, threads)
    info = {"backend": session.runtime, "precision": session.precision, "device": "cpu"}
    return session, session.config, session.anchors, info


def create_app(
    model: Path, device: str = "cpu", runtime: str | None = None, threads: int | None = None
) -> FastAPI:
    network, config, anchors, info = _network(model, device, runtime, threads)
    postprocessor = PostProcessor(config)
    app = FastAPI(title="naive RefineDet baseline")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/v1/model")
    def model_info() -> dict[str, str]:
        return info

    @app.post("/detect")
    def detect(body: bytes = Body(..., media_type="image/jpeg")) -> dict[str, Any]:
        pixels = decode(body)
        height, width = pixels.shape[1:]
        x = preprocess([pixels], config.input_size, config.normalization)  # on the CPU
        with torch.inference_mode():
            outputs = network(x.to(device))
            return detections_json(config, postprocessor, outputs, anchors, (width, height))

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_app", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, type=Path, help="checkpoint (.pth, .pth.xz) or ONNX model (.onnx)"
    )
    p.add_argument(
        "--runtime", choices=RUNTIMES, help="default: torch for a checkpoint, onnxruntime for ONNX"
    )
    p.add_argument("--threads", type=int, help="the session's threads (default: the runtime's own default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: a checkpoint on the GPU")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    args = p.parse_args(argv)
    import uvicorn

    runtime = args.runtime or default_runtime(args.model)
    app = create_app(args.model, args.device, runtime, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
