"""Fixtures for the service tests.

- ``tiny_checkpoint``: a real RefineDet (input 64, classes a/b, random weights) saved with
  ``save_checkpoint``; served through the normal loader (``Settings(model=...)``).
- ``tiny_model``: that checkpoint loaded (the reference for direct post-processing).
- ``tiny_backend``: that checkpoint loaded once per session as a ``TorchBackend`` (apps share it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from service_testing import app_for, running, settings, tiny_config

from model.checkpoint import load_model, save_checkpoint
from model.network import build_model
from service.backends.torch import TorchBackend


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(
        path, build_model(tiny_config()), metadata={"note": "random weights for tests"}, half=True
    )
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint)[0]


@pytest.fixture(scope="session")
def tiny_backend(tiny_checkpoint: Path) -> TorchBackend:
    backend = TorchBackend(tiny_checkpoint, torch.device("cpu"), max_batch=8)
    backend.load()
    return backend


@pytest.fixture(scope="session")
def client(tiny_checkpoint: Path):
    """The app serving the tiny checkpoint through the normal loader (Settings(model=...)), in-process."""
    with running(app_for(settings(model=tiny_checkpoint, max_batch_size=4))) as c:
        yield c
