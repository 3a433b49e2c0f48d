"""The naive baseline the service benchmark compares with: a minimal FastAPI app that runs the PyTorch
model once per request. No batching, no fp16, no CUDA graphs; the image is decoded with PIL and
resized / normalised on the CPU, then the same shared post-processing runs. Sync endpoint, so FastAPI
runs requests on its thread pool, as a first version of such a service would.

    python -m bench.naive_app --model model/checkpoints/refinedet320_vgg16_bccd.pth.xz --device cuda --port 8100

``POST /detect`` takes the JPEG as the raw body (``Content-Type: image/jpeg``) and answers
``{"image": {"width", "height"}, "detections": [{"label", "score", "box": [x1, y1, x2, y2]}]}``;
``GET /readyz`` answers 200 (the model is loaded before the server starts).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import torch
from fastapi import Body, FastAPI, HTTPException

from model.checkpoint import load_model
from model.postprocess import PostProcessor, to_pixels
from model.preprocess import pil_to_rgb, preprocess

SCORE_THRESHOLD = 0.5  # the service's default_score_threshold


def create_app(checkpoint: Path, device: str = "cpu") -> FastAPI:
    model, _ = load_model(checkpoint, map_location=device)
    model.requires_grad_(False)
    config = model.config
    postprocessor = PostProcessor(config)
    app = FastAPI(title="naive RefineDet baseline")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/v1/model")
    def model_info() -> dict[str, str]:  # what the service benchmark labels its rows with
        return {"backend": "torch", "precision": "fp32", "device": device}

    @app.post("/detect")
    def detect(body: bytes = Body(..., media_type="image/jpeg")) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(body)) as im:
                pixels = pil_to_rgb(im)  # uint8 RGB [3, H, W]
        except (UnidentifiedImageError, OSError) as exc:
            raise HTTPException(400, f"not an image: {exc}") from None
        height, width = pixels.shape[1:]
        x = preprocess([pixels], config.input_size, config.normalization)  # on the CPU
        with torch.inference_mode():
            outputs = model(x.to(device))
            detections = postprocessor(outputs, model.anchors).to("cpu")
        boxes, scores, labels = detections.image(0, SCORE_THRESHOLD)
        boxes = to_pixels(boxes, width, height)
        return {
            "image": {"width": width, "height": height},
            "detections": [
                {"label": config.class_names[int(c) - 1], "score": round(float(s), 4),
                 "box": [round(float(v), 1) for v in b]}
                for b, s, c in zip(boxes, scores, labels, strict=True)
            ],
        }  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_app", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="RefineDet checkpoint (.pth or .pth.xz)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    args = p.parse_args(argv)
    import uvicorn

    app = create_app(args.model, args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
