"""Tiny PASCAL VOC trees written from literals, for the data and training tests.

``write_voc(root, images, splits)`` writes Annotations/<id>.xml (1-based pixel boxes, as VOC),
JPEGImages/<id>.jpg (random noise with a white rectangle per object) and ImageSets/Main/<split>.txt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# (name, (xmin, ymin, xmax, ymax) 1-based inclusive, difficult)
Obj = tuple[str, tuple[float, float, float, float], bool]


def write_voc(
    root: Path,
    images: Mapping[str, tuple[tuple[int, int], Sequence[Obj]]],
    splits: Mapping[str, Iterable[str]],
    without_image_file: Iterable[str] = (),
) -> Path:
    """images: id -> ((width, height), objects). Returns ``root``."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    skip = set(without_image_file)
    rng = np.random.default_rng(0)
    for image_id, ((w, h), objects) in images.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, w, h, objects))
        if image_id in skip:
            continue
        pixels = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
        for _, (x1, y1, x2, y2), _ in objects:
            x1, y1 = max(int(x1) - 1, 0), max(int(y1) - 1, 0)
            pixels[y1 : max(int(y2), y1), x1 : max(int(x2), x1)] = 255
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _xml(image_id: str, w: int, h: int, objects: Sequence[Obj]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>"
        f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2), difficult in objects
    )
    return (
        f"<annotation><filename>{image_id}.jpg</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def tiny_voc(root: Path, num_images: int = 6, size: tuple[int, int] = (96, 72)) -> Path:
    """A clean two-class ("cat", "dog") set; splits train (first 2/3), val (rest), trainval (all)."""
    w, h = size
    images = {}
    for i in range(num_images):
        x, y = 5 + 7 * i % (w // 2), 4 + 5 * i % (h // 2)
        objects: list[Obj] = [("dog" if i % 2 else "cat", (x, y, x + w // 3, y + h // 3), False)]
        if i % 3 == 0:
            objects.append(("dog", (w // 2, h // 2, w - 2, h - 2), i % 2 == 1))
        images[f"img{i:03d}"] = ((w, h), objects)
    ids = list(images)
    cut = max(1, 2 * num_images // 3)
    return write_voc(root, images, {"train": ids[:cut], "val": ids[cut:], "trainval": ids})
