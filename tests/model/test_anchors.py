"""Anchor order, sizes and counts (the original code's layout)."""

from __future__ import annotations

import math

import pytest
import torch

from model.anchors import generate_anchors
from model.config import preset

SQRT2 = math.sqrt(2.0)


@pytest.fixture(scope="module")
def anchors320() -> torch.Tensor:
    return generate_anchors(preset("refinedet320_vgg16"))


@pytest.mark.parametrize(("name", "count"), [("refinedet320_vgg16", 6375), ("refinedet512_vgg16", 16320)])
def test_anchor_counts(name: str, count: int) -> None:
    config = preset(name)
    anchors = generate_anchors(config)
    assert anchors.shape == (count, 4)
    assert config.num_anchors == count
    assert anchors.dtype == torch.float32


def test_first_cell_of_level0_is_square_then_wide_then_tall(anchors320: torch.Tensor) -> None:
    c, s = 4 / 320, 32 / 320
    expected = torch.tensor(
        [[c, c, s, s], [c, c, s * SQRT2, s / SQRT2], [c, c, s / SQRT2, s * SQRT2]], dtype=torch.float32
    )
    torch.testing.assert_close(anchors320[:3], expected, rtol=0, atol=1e-7)


def test_cells_are_row_major_x_inner(anchors320: torch.Tensor) -> None:
    # second cell of row 0 moves in x; first cell of row 1 (index 40 * 3) moves in y
    torch.testing.assert_close(anchors320[3, :2], torch.tensor([12 / 320, 4 / 320]))
    torch.testing.assert_close(anchors320[40 * 3, :2], torch.tensor([4 / 320, 12 / 320]))
    torch.testing.assert_close(
        anchors320[40 * 40 * 3 - 1], torch.tensor([316 / 320, 316 / 320, 32 / 320 / SQRT2, 32 / 320 * SQRT2])
    )


@pytest.mark.parametrize(
    ("index", "step", "size"),
    [
        (40 * 40 * 3, 16, 64),
        (40 * 40 * 3 + 20 * 20 * 3, 32, 128),
        (40 * 40 * 3 + 20 * 20 * 3 + 10 * 10 * 3, 64, 256),
    ],
)
def test_first_anchor_of_each_level(anchors320: torch.Tensor, index: int, step: int, size: int) -> None:
    c, s = step / 2 / 320, size / 320
    torch.testing.assert_close(anchors320[index], torch.tensor([c, c, s, s]))
    prev = size / 2 / 320  # the anchor before is the previous level's last (tall) anchor
    torch.testing.assert_close(anchors320[index - 1, 2:], torch.tensor([prev / SQRT2, prev * SQRT2]))


def test_512_uses_the_same_pixel_sizes() -> None:
    anchors = generate_anchors(preset("refinedet512_vgg16"))
    torch.testing.assert_close(anchors[0], torch.tensor([4 / 512, 4 / 512, 32 / 512, 32 / 512]))
    torch.testing.assert_close(anchors[64 * 64 * 3], torch.tensor([8 / 512, 8 / 512, 64 / 512, 64 / 512]))
    assert anchors[-1, 0].item() == pytest.approx(1 - 32 / 512)


def test_anchors_are_not_clipped(anchors320: torch.Tensor) -> None:
    # the last level's 256-pixel anchors in a 5x5 grid stick out of the image
    assert anchors320[-1, 3].item() == pytest.approx(256 / 320 * SQRT2)
    assert (anchors320[:, 0] + anchors320[:, 2] / 2).max().item() > 1.0
