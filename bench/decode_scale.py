"""Does decoding JPEGs at a reduced scale cost accuracy? BCCD test VOC07 mAP through the service's own
detection path (``service.detector.Detector.detect`` on the queued upload, as an engine slot runs it,
then ``to_pixels`` with the header's size, as the /detect route maps boxes), whole and with
``decode_at_least`` (``--at-least``: sides the reduced decode keeps), in one run.

BCCD's photos are 640x480: for a 320 input no reduction applies to them (1/2 would give 320x240), so
they are also sent re-encoded at ``--upscale`` times their size (JPEG quality 95, annotations scaled
alike), where the reduced decode does apply: a phone photo's case.

    python -m bench.decode_scale --upscale 1,2,4 --at-least 320,640 --json bench/results/decode_scale_bccd.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import bccd_jpeg_dir, environment, format_table, parse_list, resolve_checkpoint, write_json
from model.errors import UserError

COLUMNS = (("upscale", "upscale"), ("size", "photo size"), ("at_least", "at least"), ("decode_ms", "decode ms"),
           ("mAP", "mAP"), ("delta", "delta"))  # fmt: skip


def upscaled(jpeg: bytes, factor: int) -> bytes:
    """The photo ``factor`` times larger, re-encoded as JPEG (quality 95); the photo itself for 1."""
    if factor == 1:
        return jpeg
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        big = im.convert("RGB").resize((im.width * factor, im.height * factor), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    big.save(out, format="JPEG", quality=95)
    return out.getvalue()


def score(backend: Any, dataset: Any, factor: int, at_least: int | None) -> dict[str, Any]:
    """mAP (in percent) and the median decode ms of ``dataset`` at ``factor``, through the service's path."""
    from model.evaluation.voc import evaluate_detections
    from model.postprocess import to_pixels
    from service.decoding import decode_on_host
    from service.detector import BatchDetector, ImageDetections
    from service.imaging import read_header

    detector = BatchDetector(backend, decode_at_least=at_least)
    detections, annotations, decode_ms = [], [], []
    for i, record in enumerate(dataset.records):
        data = upscaled(record.path.read_bytes(), factor)
        header = read_header(data, max_pixels=1 << 40, min_side=1)
        start = time.perf_counter()
        decode_on_host([header.deferred(data)], detector.decode_at_least)  # timed alone, then the real path
        decode_ms.append((time.perf_counter() - start) * 1e3)
        [result] = detector.detect([header.deferred(data)])
        assert isinstance(result, ImageDetections)
        boxes = to_pixels(result.boxes_xyxy, header.width, header.height) / factor  # as annotated
        detections.append({"boxes": boxes, "scores": result.scores, "labels": result.labels})
        annotations.append(dataset.annotation(i))
    metrics = evaluate_detections(detections, annotations, dataset.class_names)
    return {"upscale": factor, "size": f"{header.width}x{header.height}", "at_least": at_least,
            "decode_ms": round(statistics.median(decode_ms), 2), "mAP": round(100 * metrics["mAP"], 2),
            "per_class": {k: round(100 * v, 2) for k, v in metrics["per_class"].items()}}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.common import service_backend
    from bench.service_bench import service_model
    from model.data.voc import VOCDetection
    from service.process import prepare_process
    from service.settings import Settings

    prepare_process()  # the serving process's allocator settings
    factors = parse_list(args.upscale, int)
    sizes = parse_list(args.at_least, int)
    if not factors or min(factors) < 1 or max(factors) > 8:
        raise UserError("--upscale takes factors 1 to 8")
    jpegs = bccd_jpeg_dir()
    if jpegs is None:
        raise UserError("no BCCD data set (set REFINEDET_BCCD)")
    checkpoint = resolve_checkpoint(args.model, Path("."))
    served, backend_name = service_model(args, checkpoint)
    backend, _ = service_backend(Settings(model=served, backend=backend_name or "auto", device="cpu"))
    backend.load()
    dataset = VOCDetection(jpegs.parent, args.split, class_names=backend.loaded_config.class_names)
    if args.limit:
        dataset.records = dataset.records[: args.limit]
    rows = []
    with torch.inference_mode():
        for factor in factors:
            group = [score(backend, dataset, factor, at_least) for at_least in (None, *sizes)]
            for row in group[1:]:
                row["delta"] = round(row["mAP"] - group[0]["mAP"], 2)
            rows += group
            print(format_table(group, COLUMNS), flush=True)
    return {"benchmark": "decode_scale", "served": str(served), "split": args.split, "images": len(dataset.records),
            "environment": environment(), "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: the shipped one)")
    p.add_argument("--cpu-engine", choices=["auto", "int8", "fp32", "torch"], default="auto",
                   help="serve conversion.cpu_engine's artifact of --model, as the service does (default auto)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, help="--cpu-engine's cache (default REFINEDET_CACHE_DIR)")
    p.add_argument("--split", default="test", help="BCCD split (default test)")
    p.add_argument("--upscale", default="1,2", help="photo size factors to test (default 1,2)")
    p.add_argument(
        "--at-least", default="320", help="reduced decodes to compare with the whole (default 320)"
    )
    p.add_argument("--limit", type=int, help="only the first N images (a quick look; mAP needs them all)")
    p.add_argument("--json", type=Path, help="write the results here (atomically)")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        print(f"decode_scale: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(result["rows"], COLUMNS))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
