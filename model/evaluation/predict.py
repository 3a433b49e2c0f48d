"""Detection on image files (``refinedet predict``): one JSON file and annotated copies of the images.

The JSON (``detections.json``) holds per image: ``file``, ``width``, ``height`` and ``detections``,
each ``{label: class name, class_id: network class id 1..C-1, score, box: {x1, y1, x2, y2}}`` in
pixels of the original image. Annotated images are JPEGs named ``<stem>_pred.jpg``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import Tensor, nn

from model.checkpoint import atomic_write, unwrap
from model.errors import UserError
from model.evaluation.report import write_json
from model.evaluation.runner import predict_dataset
from model.preprocess import load_image

if TYPE_CHECKING:
    from PIL import Image

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


class ImageFiles:
    """Image paths as a data set for ``predict_dataset`` (``__len__``, ``load_image(i)``)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise UserError(f"image file(s) not found: {', '.join(missing)}")

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Tensor:
        try:
            return load_image(self.paths[index])
        except Exception as exc:  # PIL raises several types for unreadable files
            raise UserError(f"{self.paths[index]} is not a readable image ({exc})") from None


def detection_records(det: dict[str, Tensor], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image detections (boxes [N, 4] px xyxy, scores, labels 1..C-1) -> JSON-ready dicts."""
    records = []
    for box, score, label in zip(
        det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
    ):
        records.append(
            {
                "label": class_names[label - 1],
                "class_id": int(label),
                "score": round(float(score), 5),
                "box": dict(zip(("x1", "y1", "x2", "y2"), (round(v, 2) for v in box), strict=True)),
            }
        )
    return records


def draw_detections(image: Tensor, records: Sequence[dict[str, Any]]) -> Image.Image:
    """uint8 RGB image [3, H, W] -> PIL image with each box, its class name and score drawn on it."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(max(canvas.size) / 320))
    font = ImageFont.load_default(size=max(10, round(max(canvas.size) / 48)))
    for rec in records:
        colour = PALETTE[(rec["class_id"] - 1) % len(PALETTE)]
        b = rec["box"]
        draw.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=colour, width=line)
        text = f"{rec['label']} {rec['score']:.2f}"
        left, top, right, bottom = draw.textbbox((b["x1"], b["y1"]), text, font=font)
        y = max(0.0, b["y1"] - (bottom - top) - 2)
        draw.rectangle((left, y, right + 2, y + bottom - top + 2), fill=colour)
        draw.text((b["x1"] + 1, y - (top - b["y1"])), text, fill=(255, 255, 255), font=font)
    return canvas


def _save_jpeg(canvas: Image.Image, f: BinaryIO) -> None:
    canvas.save(f, format="JPEG", quality=92)


def _output_names(paths: Sequence[Path]) -> list[str]:
    """Distinct ``<stem>_pred.jpg`` names (a counter is added when two inputs share a stem)."""
    names, used = [], set()
    for path in paths:
        name, n = f"{path.stem}_pred.jpg", 1
        while name in used:
            name, n = f"{path.stem}_pred_{n}.jpg", n + 1
        used.add(name)
        names.append(name)
    return names


def predict_files(
    model: nn.Module,
    paths: Sequence[str | Path],
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    score_threshold: float = 0.5,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Detect on image files; writes ``output_dir/detections.json`` and annotated JPEGs (atomically).

    Selection runs with ``score_threshold`` in place of the config's (equivalent to filtering
    afterwards: NMS is greedy by score). Returns the JSON document.
    """
    files = ImageFiles(paths)
    config = unwrap(model).config
    postprocess = dataclasses.replace(config.postprocess, score_threshold=score_threshold)
    output_dir = Path(output_dir)
    names = _output_names(files.paths)
    clash = {(output_dir / n).resolve() for n in names} & {p.resolve() for p in files.paths}
    if clash:
        raise UserError(f"{sorted(map(str, clash))[0]} is an input image; choose another --output directory")
    predictions = predict_dataset(
        model, files, device, batch_size, postprocess=postprocess, progress=progress
    )
    images = []
    for i, (det, name) in enumerate(zip(predictions, names, strict=True)):
        image = files.load_image(i)
        records = detection_records(det, config.class_names)
        target = output_dir / name
        canvas = draw_detections(image, records)
        atomic_write(target, partial(_save_jpeg, canvas))
        height, width = image.shape[-2:]
        images.append(
            {
                "file": str(files.paths[i]),
                "width": int(width),
                "height": int(height),
                "annotated": name,
                "detections": records,
            }
        )
    document = {
        "model": config.name,
        "class_names": list(config.class_names),
        "score_threshold": score_threshold,
        "images": images,
    }
    write_json(output_dir / "detections.json", document)
    return document
