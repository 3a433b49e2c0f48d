"""Fixtures for the evaluation tests: a tiny random RefineDet, its checkpoint, an in-memory detection
data set following the data-set contract, and a tiny PASCAL VOC tree written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import build_model

CLASSES = ("a", "b")


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return build_model(preset("refinedet320_vgg16", input_size=64, class_names=CLASSES)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", tiny_model, {"note": "random init"})


class FakeDetectionDataset:
    """In-memory images and annotations with the ``VOCDetection`` interface."""

    def __init__(self, images: list[torch.Tensor], annotations: list[dict], class_names=CLASSES) -> None:
        self.images, self.annotations, self.class_names = images, annotations, tuple(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def annotation(self, index: int) -> dict:
        return self.annotations[index]


def make_fake_dataset(n: int = 3, seed: int = 0) -> FakeDetectionDataset:
    g = torch.Generator().manual_seed(seed)
    images, anns = [], []
    for i in range(n):
        h, w = 48 + 8 * i, 64 + 16 * (i % 2)
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        anns.append(
            {
                "boxes": torch.tensor([[4.0, 4.0, 30.0, 28.0], [20.0, 10.0, 60.0, 40.0]]),
                "labels": torch.tensor([1, 2]),
                "difficult": torch.tensor([False, i == 1]),
                "image_id": f"img{i}",
                "width": w,
                "height": h,
            }
        )
    return FakeDetectionDataset(images, anns)


@pytest.fixture
def fake_dataset() -> FakeDetectionDataset:
    return make_fake_dataset()


@pytest.fixture
def make_dataset():
    """``make_dataset(n, seed)`` -> a ``FakeDetectionDataset`` of n random images."""
    return make_fake_dataset


VOC_OBJECT = """  <object><name>{name}</name><difficult>{difficult}</difficult>
    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>
"""


def write_voc_tree(root: Path, split: str = "test", n: int = 3, seed: int = 0) -> Path:
    """A tiny VOC-layout tree: JPEGs of 80x60 and XML annotations of classes ``a``/``b``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg"
        )
        objects = VOC_OBJECT.format(name="a", difficult=0, x1=5, y1=6, x2=40, y2=44)
        objects += VOC_OBJECT.format(name="b", difficult=int(i == 0), x1=30, y1=10, x2=75, y2=50)
        xml = (
            f"<annotation><filename>{image_id}.jpg</filename>"
            f"<size><width>80</width><height>60</height><depth>3</depth></size>\n{objects}</annotation>\n"
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def voc_tree(tmp_path) -> Path:
    return write_voc_tree(tmp_path / "VOC")
