"""Fixtures for the conversion tests: random-weight checkpoints, their ONNX exports, test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conversion.onnx_export import export_checkpoint
from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import build_model

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def make_checkpoint(path, name: str, input_size: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    changes = {"class_names": ("cell", "platelet")}
    if input_size:
        changes["input_size"] = input_size
    model = build_model(preset(name, **changes)).eval()
    save_checkpoint(path, model, metadata={"note": "random weights for tests"})
    return path, model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """refinedet320_vgg16 at input 64 with two classes (random weights)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", "refinedet320_vgg16", 64)[0]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_checkpoint):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_checkpoint(tiny_checkpoint, path)
    return path


@pytest.fixture(scope="session")
def fixed_onnx(tmp_path_factory, tiny_checkpoint):
    """The tiny model with a fixed batch of 2 and opset 13, in its own directory."""
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    export_checkpoint(tiny_checkpoint, path, batch=2, opset=13)
    return path


def write_images(directory, count: int, seed: int = 0, sizes=((96, 80), (64, 64), (120, 72))):
    """Random RGB images of several sizes with a few flat rectangles (so there is structure)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        pixels[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, size=3, dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img{i:02d}.png")
    return directory


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 5)
