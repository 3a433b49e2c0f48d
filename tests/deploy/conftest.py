"""Fixtures for the deploy tests: a tiny real checkpoint (input 64, classes a/b, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import build_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    config = preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))
    save_checkpoint(path, build_model(config), metadata={"note": "random weights for tests"}, half=True)
    return path
