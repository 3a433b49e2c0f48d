"""COCO-format detection data sets (an images folder + an instances JSON), read with pycocotools.

- Labels: the JSON's categories sorted by id get labels 1..C-1 (``class_names`` are their names);
  ``category_ids[label - 1]`` maps back, ``label_of[category_id]`` forward.
- Boxes: COCO ``[x, y, w, h]`` in continuous pixel coordinates -> xyxy, clipped to [0, W] x [0, H];
  zero-area boxes are dropped. Crowd regions (``iscrowd=1``) are not training targets and are left out
  (COCOeval handles them from the JSON). ``image_id`` is the COCO image id as a string; ``image_ids``
  holds them as ints, one per index, and ``coco`` is the pycocotools index (for COCOeval).
- Images whose file is missing are skipped; problems are reported in one ``DatasetWarning``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.data.records import DatasetProblems, DetectionDataset, ImageRecord, sanitize_boxes
from model.errors import UserError


class COCODetection(DetectionDataset):
    """``COCODetection(images_dir, annotation_json, transform=None)``; see ``DetectionDataset``."""

    def __init__(
        self, images_dir: str | Path, annotation_json: str | Path, transform: Callable | None = None
    ) -> None:
        images_dir, annotation_json = Path(images_dir), Path(annotation_json)
        if not images_dir.is_dir():
            raise UserError(
                f"COCO images folder {images_dir} does not exist (pass the folder of the JSON's file_names)"
            )
        if not annotation_json.is_file():
            raise UserError(
                f"COCO annotation file {annotation_json} does not exist (e.g. instances_train2017.json)"
            )
        self.coco = _load_coco(annotation_json)
        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if not categories:
            raise UserError(f"{annotation_json} defines no categories")
        self.category_ids: list[int] = [int(c["id"]) for c in categories]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        names = tuple(str(c["name"]) for c in categories)
        if len(set(names)) != len(names):
            raise UserError(f"{annotation_json}: category names repeat ({names}); they must be unique")
        self.name = annotation_json.name
        problems = DatasetProblems()
        files = set(os.listdir(images_dir))
        records = []
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            if info["file_name"] not in files:
                problems.add("missing_image", str(images_dir / info["file_name"]))
                continue
            anns = self.coco.imgToAnns.get(image_id, [])
            records.append(self._record(images_dir / info["file_name"], info, anns, problems))
        if not records:
            raise UserError(
                f"{annotation_json}: none of its images is in {images_dir} ({problems.summary()})"
            )
        problems.warn(f"COCO {self.name}")
        super().__init__(records, names, transform)
        self.problems = problems
        self.image_ids: list[int] = [int(r.image_id) for r in records]
        self.ids = self.image_ids

    def category_id(self, label: int) -> int:
        """Network label 1..C-1 -> the JSON's category id."""
        return self.category_ids[label - 1]

    def _record(
        self, path: Path, info: dict[str, Any], anns: list[dict[str, Any]], problems: DatasetProblems
    ) -> ImageRecord:
        where = f"image {info['id']} ({info['file_name']})"
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        problems.add("crowd", where, len(crowd))
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        unknown = [a for a in anns if a["category_id"] not in self.label_of]
        problems.add(
            "unknown_class", f"{where}: category {unknown[0]['category_id']}" if unknown else "", len(unknown)
        )
        anns = [a for a in anns if a["category_id"] in self.label_of]
        bad = [a for a in anns if len(a.get("bbox") or ()) != 4]
        problems.add("bad_object", f"{where}: annotation {bad[0].get('id')}" if bad else "", len(bad))
        anns = [a for a in anns if len(a.get("bbox") or ()) == 4]
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        labels = np.asarray([self.label_of[a["category_id"]] for a in anns], dtype=np.int64)
        width, height = int(info["width"]), int(info["height"])
        keep = sanitize_boxes(boxes, float(width), float(height), problems, where)
        if not keep.any():
            problems.add("no_objects", where)
        return ImageRecord(
            path,
            str(info["id"]),
            width,
            height,
            boxes[keep],
            labels[keep],
            np.zeros(int(keep.sum()), dtype=bool),
        )


def _load_coco(annotation_json: Path) -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise UserError("COCO data sets need pycocotools: pip install 'refinedet[train]'") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(annotation_json))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise UserError(
            f"{annotation_json} is not a COCO instances file ({type(exc).__name__}: {exc})"
        ) from None
