"""How many passes of greedy NMS's fixed-point iteration real photos need (sizes the sync-free mode).

    python -m bench.nms_passes [--checkpoint C] [--images DIR] [--every 3] [--json out.json]

For each photo: the network's detections are decoded and, per class, the ``top_k`` candidates above
the score threshold go through the iteration ``keep <- nms_pass(keep)`` from "all valid" until a pass
changes nothing; the count includes that confirming pass, so the sync-free mode with
``SYNC_FREE_NMS_PASSES`` >= the count returns ``converged``. Prints the histogram of counts (per image,
the largest over its classes) and writes it as JSON. CPU, batch 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from bench.common import environment, find_jpegs, resolve_checkpoint, write_json
from model.errors import UserError
from model.postprocess import SYNC_FREE_NMS_PASSES, decode_predictions, nms_pass, suppression_matrix


def passes_needed(boxes_xyxy: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> int:
    """Passes until the iteration stops changing (including the pass that shows it), over all groups."""
    overlaps = suppression_matrix(boxes_xyxy, iou_threshold, torch.float32)
    valid_f = valid.float()[:, None, :]
    keep, passes = valid_f, 0
    while True:
        passes += 1
        new_keep = nms_pass(overlaps, valid_f, keep)
        if torch.equal(new_keep, keep):
            return passes
        keep = new_keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nms_passes", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="default: the shipped checkpoint")
    p.add_argument("--images", action="append", default=[], help="JPEG file or folder (default: BCCD)")
    p.add_argument("--every", type=int, default=1, help="use every N-th photo (default 1: all)")
    p.add_argument("--json", type=Path, help="write the histogram here")
    args = p.parse_args(argv)
    try:
        if args.every < 1:
            raise UserError("--every must be >= 1")
        from model.checkpoint import load_model
        from model.preprocess import load_image, preprocess

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = resolve_checkpoint(args.checkpoint, Path(tmp))
            model, _ = load_model(checkpoint, map_location="cpu")
        model = model.float().eval()
        cfg, pp = model.config, model.config.postprocess
        photos = find_jpegs(args.images, limit=100_000)[:: args.every]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts: Counter[int] = Counter()
    for path in photos:
        x = preprocess([load_image(path)], cfg.input_size, cfg.normalization)
        with torch.inference_mode():
            arm_loc, arm_conf, odm_loc, odm_conf = model(x)
            boxes, scores = decode_predictions(arm_loc, arm_conf, odm_loc, odm_conf, model.anchors, cfg)
            per_class = scores[0].T  # [C-1, A]
            top_scores, top_idx = per_class.topk(min(pp.top_k, per_class.shape[1]), dim=-1)
            counts[passes_needed(boxes[0][top_idx], top_scores > pp.score_threshold, pp.nms_threshold)] += 1
    histogram = dict(sorted(counts.items()))
    print(f"{len(photos)} photos, passes needed (count: photos): {histogram}")
    print(f"largest: {max(histogram)}; SYNC_FREE_NMS_PASSES = {SYNC_FREE_NMS_PASSES}")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "nms_passes",
                "checkpoint": str(checkpoint),
                "photos": len(photos),
                "histogram": {str(k): v for k, v in histogram.items()},
                "sync_free_nms_passes": SYNC_FREE_NMS_PASSES,
                "environment": environment(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
