"""PASCAL VOC detection data sets: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.

Several roots (e.g. VOC2007 and VOC2012, "07+12") are joined in the order given. Conventions:

- Boxes: VOC XML holds 1-based inclusive pixel indices; like the original SSD/RefineDet code we
  subtract 1 from all four, giving 0-based inclusive indices, clipped to [0, W-1] x [0, H-1].
  Normalised boxes divide them by (W, H). ``model.evaluation`` scores them with the devkit's
  inclusive IoU (``x2 - x1 + 1``). A box with x2 <= x1 or y2 <= y1 (e.g. BCCD's two one-pixel
  boxes, xmin == xmax) is dropped as zero-area.
- Classes: ``class_names`` given -> that order, other objects ignored (counted); otherwise every name
  found in the split, sorted alphabetically (for VOC this is exactly ``model.config.VOC_CLASSES``).
  Open evaluation splits with the trained model's ``config.class_names``.
- ``difficult`` is kept as a flag (training uses those boxes; evaluation ignores them) unless
  ``keep_difficult=False`` drops them.
- ``image_id`` is the split's id, prefixed with the root's folder name when several roots are joined.
- Missing image or annotation files and unreadable XML skip that image; out-of-image boxes are
  clipped; all of it is reported in one ``DatasetWarning`` at construction.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.data.records import DatasetProblems, DetectionDataset, ImageRecord, sanitize_boxes
from model.errors import UserError

VOC_LAYOUT = "a PASCAL VOC folder with Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt"


@dataclass
class _Parsed:
    path: Path
    image_id: str
    width: int
    height: int
    names: list[str]
    boxes: np.ndarray  # [G, 4] 0-based pixels, not yet clipped
    difficult: np.ndarray


class VOCDetection(DetectionDataset):
    """``VOCDetection(roots, split, class_names=None, transform=None, keep_difficult=True)``; see
    ``model.data.records.DetectionDataset`` for the item format."""

    def __init__(
        self,
        roots: Sequence[str | Path] | str | Path,
        split: str = "trainval",
        class_names: Sequence[str] | None = None,
        transform: Callable | None = None,
        keep_difficult: bool = True,
    ) -> None:
        paths = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
        if not paths:
            raise UserError(f"no dataset root given: pass {VOC_LAYOUT}")
        self.roots, self.split = paths, split
        self.name = f"{'+'.join(r.name for r in paths)} ({split})"
        problems = DatasetProblems()
        parsed: list[_Parsed] = []
        for root in paths:
            ids = split_ids(root, split)
            prefix = f"{root.name}/" if len(paths) > 1 else ""
            parsed += _parse_root(root, ids, prefix, problems)
        names = tuple(class_names) if class_names is not None else _found_classes(parsed, self.name)
        records = [_record(p, names, keep_difficult, problems) for p in parsed]
        if not records:
            raise UserError(f"{self.name}: no usable image in the split ({problems.summary()})")
        problems.warn(f"VOC {self.name}")
        super().__init__(records, names, transform)
        self.problems = problems
        self.ids = [r.image_id for r in records]


def split_ids(root: Path, split: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Main/<split>.txt`` (clear errors for a wrong root/split)."""
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; pass {VOC_LAYOUT}")
    if not (root / "Annotations").is_dir():
        years = sorted(p.name for p in root.glob("VOC20*") if (p / "Annotations").is_dir())
        hint = (
            f" (it holds {', '.join(years)}: pass each of them, e.g. --data {root / years[0]})"
            if years
            else ""
        )
        raise UserError(f"{root} has no Annotations/ folder: it is not {VOC_LAYOUT}{hint}")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        main = root / "ImageSets" / "Main"
        known = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
        raise UserError(
            f"split {split!r} not found in {root}: no {split_file.relative_to(root)} "
            f"(available splits: {', '.join(known) or 'none'})"
        )
    lines = split_file.read_text().split("\n")
    return [line.split()[0] for line in lines if line.strip()]


def _parse_root(root: Path, ids: list[str], prefix: str, problems: DatasetProblems) -> list[_Parsed]:
    images_dir, ann_dir = root / "JPEGImages", root / "Annotations"
    image_files = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
    out = []
    for image_id in ids:
        xml_path = ann_dir / f"{image_id}.xml"
        if not xml_path.is_file():
            problems.add("missing_annotation", str(xml_path))
            continue
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            problems.add("bad_annotation", f"{xml_path} ({exc})")
            continue
        file_name = _image_file(image_id, tree, image_files)
        if file_name is None:
            problems.add("missing_image", str(images_dir / f"{image_id}.jpg"))
            continue
        out.append(_parse_xml(tree, images_dir / file_name, prefix + image_id, problems))
    return out


def _image_file(image_id: str, tree: ET.Element, image_files: set[str]) -> str | None:
    for name in (f"{image_id}.jpg", (tree.findtext("filename") or "").strip()):
        if name in image_files:
            return name
    return None


def _parse_xml(tree: ET.Element, path: Path, image_id: str, problems: DatasetProblems) -> _Parsed:
    width, height = _size(tree, path)
    names, boxes, difficult = [], [], []
    for obj in tree.iter("object"):
        box = obj.find("bndbox")
        try:
            coords = [float(box.findtext(k)) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr,arg-type]
        except (AttributeError, TypeError, ValueError):  # no <bndbox> or a missing / non-numeric coordinate
            problems.add("bad_object", f"{path.name}: {ET.tostring(obj, encoding='unicode')[:80]!r}")
            continue
        names.append((obj.findtext("name") or "").strip())
        boxes.append(coords)
        difficult.append(int(float(obj.findtext("difficult") or 0)) == 1)
    return _Parsed(
        path,
        image_id,
        width,
        height,
        names,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(difficult, dtype=bool),
    )


def _size(tree: ET.Element, path: Path) -> tuple[int, int]:
    try:
        width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))  # type: ignore[arg-type]
        if width > 0 and height > 0:
            return width, height
    except (TypeError, ValueError):
        pass
    from PIL import Image  # no usable <size>: read it from the image header

    with Image.open(path) as im:
        return im.size


def _found_classes(parsed: list[_Parsed], name: str) -> tuple[str, ...]:
    found = sorted({n for p in parsed for n in p.names if n})
    if not found:
        raise UserError(f"{name}: no object in the split, so no class list: pass the class names (--classes)")
    return tuple(found)


def _record(
    p: _Parsed, class_names: tuple[str, ...], keep_difficult: bool, problems: DatasetProblems
) -> ImageRecord:
    label_of = {n: i + 1 for i, n in enumerate(class_names)}
    labels = np.asarray([label_of.get(n, 0) for n in p.names], dtype=np.int64)
    known = labels > 0
    if not known.all():
        problems.add(
            "unknown_class",
            f"{p.image_id}: {[n for n in p.names if n not in label_of][:3]}",
            int((~known).sum()),
        )
    boxes, labels, difficult = p.boxes[known], labels[known], p.difficult[known]
    keep = sanitize_boxes(boxes, p.width - 1.0, p.height - 1.0, problems, p.image_id)
    if not keep_difficult:
        keep &= ~difficult
    if not keep.any():
        problems.add("no_objects", p.image_id)
    return ImageRecord(p.path, p.image_id, p.width, p.height, boxes[keep], labels[keep], difficult[keep])
