"""Fixtures for the benchmark tests: a tiny random-weight checkpoint (input 64, classes a/b) and a
folder of small synthetic JPEG photos, so that nothing depends on the shipped model or on BCCD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import build_model
from service.benchmark import synthetic_jpeg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(preset("refinedet320_vgg16", input_size=64, class_names=("a", "b")))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model, metadata={"trained": False})


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate([(96, 64), (80, 80), (64, 112)]):
        (folder / f"photo{i}.jpg").write_bytes(synthetic_jpeg(w, h, seed=i))
    return folder


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint exported to ONNX (raw heads, dynamic batch), with its manifest."""
    from conversion.onnx_export import export_checkpoint

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_checkpoint(tiny_checkpoint, path)
    return path
