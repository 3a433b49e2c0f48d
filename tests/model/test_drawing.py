"""model/drawing.py: the annotated image. Labels are readable (sized from the image), inside it, never
struck through by a box drawn later, and kept apart where there is room."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from model.drawing import PALETTE, draw_detections, label_font, layout_labels, text_colour


def record(class_id: int, score: float, x1: float, y1: float, x2: float, y2: float) -> dict:
    return {"label": ["Platelets", "RBC", "WBC"][class_id], "class_id": class_id, "score": score,
            "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}  # fmt: skip


def crowd(n: int = 24, seed: int = 0) -> list[dict]:
    """Overlapping cells in a 640x480 photo, as in a dense BCCD smear."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = rng.uniform(0, 560), rng.uniform(0, 400)
        out.append(
            record(
                i % 3, float(rng.uniform(0.3, 1.0)), x, y, x + rng.uniform(60, 110), y + rng.uniform(60, 100)
            )
        )
    return out


def grey(width: int = 640, height: int = 480) -> torch.Tensor:
    return torch.full((3, height, width), 128, dtype=torch.uint8)


def test_labels_are_sized_from_the_image_and_stay_inside_it():
    for width, height in ((640, 480), (1920, 1080), (96, 72)):
        font = label_font(width, height)
        assert font.size == max(12, round(min(width, height) * 0.034))
        for label in layout_labels(crowd(), width, height, font):
            r = label.rect
            assert r.x >= 0 and r.x + r.w <= max(width, r.w) and r.y >= 0 and r.y + r.h <= max(height, r.h)
    assert label_font(640, 480).size >= 16  # was ~9 px on a 640x480 photo


def test_no_box_strikes_through_a_label():
    """Every pixel of a label chip is its colour, its text colour or a blend of the two: no line of another
    box crosses it (boxes are all drawn before any label)."""
    records = crowd()
    canvas = np.asarray(draw_detections(grey(), records), dtype=np.float64)
    labels = layout_labels(records, 640, 480, label_font(640, 480))
    for rec, _, r in labels[-6:]:  # the last placed: the most likely to sit over other boxes
        chip = np.array(PALETTE[rec["class_id"]], dtype=np.float64)
        ink = np.array(text_colour(PALETTE[rec["class_id"]]), dtype=np.float64)
        patch = canvas[int(r.y) + 1 : int(r.y + r.h) - 1, int(r.x) + 1 : int(r.x + r.w) - 1].reshape(-1, 3)
        t = np.clip((patch - chip) @ (ink - chip) / ((ink - chip) @ (ink - chip)), 0, 1)
        off_segment = np.linalg.norm(patch - (chip + t[:, None] * (ink - chip)), axis=1)
        assert off_segment.max() < 12, (rec, off_segment.max())


def test_labels_do_not_overlap_where_there_is_room():
    spread = [record(i % 3, 0.9 - i / 100, 20 + 150 * (i % 4), 40 + 110 * (i // 4), 120 + 150 * (i % 4), 120 + 110 * (i // 4)) for i in range(16)]  # fmt: skip
    rects = [label.rect for label in layout_labels(spread, 640, 480, label_font(640, 480))]
    assert all(a.overlap(b) == 0 for a, b in itertools.combinations(rects, 2))
    # a box at the top edge gets its label inside the image, not cut off above it
    [top] = layout_labels([record(1, 0.9, 10, 0, 100, 80)], 640, 480, label_font(640, 480))
    assert top.rect.y == 0


def test_light_chips_get_dark_text():
    assert text_colour((70, 240, 240)) == (17, 17, 17) and text_colour((0, 130, 200)) == (255, 255, 255)
