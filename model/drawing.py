"""Detections drawn on their image: ``refinedet predict --annotate`` and the service's annotated image.

Every box is drawn first, then every label (best score first), so that no box drawn later strikes through
a label in a crowded area. A label is a filled chip of its class colour, sized from the image (about 3.4 %
of its short side: 16 px on a 640x480 photo), placed inside the image: above the box's top-left corner,
else inside the box's top, else below the box, else inside its bottom, whichever spot overlaps the labels
already placed least (the first free one). The page at ``/`` (service/static/app.js) draws with the same
rule and the same ``PALETTE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

# Class colours, by class_id (service/static/app.js has the same list: tests/service/test_page.py checks).
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)
LABEL_SCALE = 0.034  # label text height / the image's short side
MIN_LABEL_PX = 12


class Rect(NamedTuple):
    x: float
    y: float
    w: float
    h: float

    def overlap(self, other: Rect) -> float:
        dx = min(self.x + self.w, other.x + other.w) - max(self.x, other.x)
        dy = min(self.y + self.h, other.y + other.h) - max(self.y, other.y)
        return max(dx, 0.0) * max(dy, 0.0)


def text_colour(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Dark text on light chips (cyan, ...), white on the others."""
    r, g, b = colour
    return (17, 17, 17) if 0.299 * r + 0.587 * g + 0.114 * b > 160 else (255, 255, 255)


def place_label(
    box: dict[str, float], w: float, h: float, width: int, height: int, placed: Sequence[Rect]
) -> Rect:
    """Where a ``w`` x ``h`` label of ``box`` (x1, y1, x2, y2) goes in a ``width`` x ``height`` image."""
    x = min(max(box["x1"], 0.0), max(width - w, 0.0))
    spots = [box["y1"] - h, box["y1"], box["y2"], box["y2"] - h]
    rects = [Rect(x, min(max(y, 0.0), max(height - h, 0.0)), w, h) for y in spots]
    return min(rects, key=lambda r: sum(r.overlap(p) for p in placed))  # min keeps the first of equals


class Label(NamedTuple):
    record: dict[str, Any]
    text: str
    rect: Rect


def label_font(width: int, height: int) -> Any:
    """The labels' font for a ``width`` x ``height`` image (PIL's bundled FreeType font, scaled)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=max(MIN_LABEL_PX, round(min(width, height) * LABEL_SCALE)))


def layout_labels(records: Sequence[dict[str, Any]], width: int, height: int, font: Any) -> list[Label]:
    """Each record's label text and chip, best score first (``place_label``)."""
    placed: list[Rect] = []
    labels = []
    pad_x, pad_y = _padding(font.size)
    for rec in sorted(records, key=lambda r: -r["score"]):
        text = f"{rec['label']} {rec['score']:.2f}"
        left, top, right, bottom = font.getbbox(text)
        rect = place_label(
            rec["box"], right - left + 2 * pad_x, bottom - top + 2 * pad_y, width, height, placed
        )
        placed.append(rect)
        labels.append(Label(rec, text, rect))
    return labels


def draw_detections(image: Tensor, records: Sequence[dict[str, Any]]) -> Image.Image:
    """uint8 RGB image [3, H, W] -> PIL image with each box, its class name and score drawn on it.
    ``records`` are response/JSONL detections: label, class_id, score, box (x1, y1, x2, y2 in pixels)."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")
    width, height = canvas.size
    line = max(2, round(min(width, height) / 240))
    font = label_font(width, height)
    pad_x, pad_y = _padding(font.size)
    draw = ImageDraw.Draw(canvas)
    for rec in sorted(records, key=lambda r: r["score"]):  # every box first, the best on top
        b = rec["box"]
        draw.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=_colour(rec), width=line)
    for rec, text, rect in layout_labels(records, width, height, font):  # then every label
        left, top, _, _ = font.getbbox(text)
        draw.rectangle((rect.x, rect.y, rect.x + rect.w - 1, rect.y + rect.h - 1), fill=_colour(rec))
        draw.text(
            (rect.x + pad_x - left, rect.y + pad_y - top), text, fill=text_colour(_colour(rec)), font=font
        )
    return canvas


def _colour(record: dict[str, Any]) -> tuple[int, int, int]:
    return PALETTE[record["class_id"] % len(PALETTE)]


def _padding(size: float) -> tuple[int, int]:
    return max(2, round(size / 4)), max(1, round(size / 7))
