"""VOC mAP of what a running service serves, measured through HTTP: every image of a VOC split is posted to
``/detect`` as its file's bytes (what a client sends), and the answers are scored with the project's VOC
metric (``model.evaluation.voc``), as ``refinedet eval`` scores a checkpoint or an artifact.

The service must keep what evaluation keeps: start it with ``REFINEDET_MAX_DETECTIONS=200`` (the model's
``keep_top_k``) and query with ``score_threshold=0.01`` (the evaluation threshold, the default here)::

    REFINEDET_MAX_DETECTIONS=200 refinedet serve --port 8000 &
    python -m bench.http_eval --url http://127.0.0.1:8000 --data ../shared/data/BCCD --split test \
        --json bench/results/http_eval_bccd.json

Prints the mAP, per-class AP and the engine the service reports (/v1/model); writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch


def detect(
    client: httpx.Client, path: Path, score_threshold: float, max_detections: int, key: str | None
) -> dict:
    headers = {"content-type": "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"}
    if key:
        headers["X-API-Key"] = key
    params = {"score_threshold": score_threshold, "max_detections": max_detections}
    r = client.post("/detect", content=path.read_bytes(), headers=headers, params=params)
    if r.status_code != 200:
        raise RuntimeError(f"{path.name}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


def as_detections(answer: dict, class_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """/detect's JSON -> the metric's per-image dict (pixel xyxy boxes, scores, labels 1..C-1)."""
    found = answer["detections"]
    boxes = [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([d["score"] for d in found], dtype=torch.float32),
        "labels": torch.tensor([class_names.index(d["label"]) + 1 for d in found], dtype=torch.int64),
    }


def evaluate(url: str, data: Path, split: str, score_threshold: float, max_detections: int,
             clients: int, metric: str, key: str | None) -> dict[str, Any]:  # fmt: skip
    from model.data.voc import VOCDetection
    from model.evaluation.voc import evaluate_detections

    headers = {"X-API-Key": key} if key else {}
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        info = client.get("/v1/model").raise_for_status().json()
        class_names = tuple(info["classes"])
        dataset = VOCDetection([data], split, class_names=class_names, keep_difficult=True)
        paths = [r.path for r in dataset.records]
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda p: detect(client, p, score_threshold, max_detections, key), paths))
    detections = [as_detections(a, class_names) for a in answers]
    annotations = [dataset.annotation(i) for i in range(len(dataset))]
    result = evaluate_detections(detections, annotations, class_names, use_07_metric=metric == "voc07")
    return {
        "url": url, "split": split, "images": len(paths), "metric": result["metric"],
        "mAP": round(100 * result["mAP"], 2),
        "per_class": {k: round(100 * v, 2) for k, v in result["per_class"].items()},
        "score_threshold": score_threshold, "max_detections": max_detections,
        "served": {k: info.get(k) for k in ("name", "backend", "device", "precision", "artifact_sha256")},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--data", required=True, help="VOC-layout root, e.g. ../shared/data/BCCD")
    p.add_argument("--split", default="test")
    p.add_argument("--score-threshold", type=float, default=0.01)
    p.add_argument("--max-detections", type=int, default=200)
    p.add_argument("--clients", type=int, default=2, help="requests at once (default 2)")
    p.add_argument("--metric", choices=("voc07", "voc12"), default="voc07")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = evaluate(args.url, Path(args.data), args.split, args.score_threshold, args.max_detections,
                      args.clients, args.metric, args.api_key)  # fmt: skip
    served = result["served"]
    print(f"{result['metric']} mAP through HTTP: {result['mAP']:.2f} on {result['images']} {args.split} images "
          f"({served['backend']}, {served['precision']} on {served['device']})")  # fmt: skip
    for name, ap in result["per_class"].items():
        print(f"  {name:12s} {ap:6.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
