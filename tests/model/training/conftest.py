"""Tiny training runs: a 4-image two-class VOC tree and options for 64x64 inputs on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_voc import tiny_voc

from model.training.options import TrainOptions


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_voc(tmp_path_factory.mktemp("voc"), num_images=4)


@pytest.fixture
def make_options(voc_root: Path, tmp_path: Path):
    """``make_options(name, **changes)``: TrainOptions writing into ``tmp_path / name``."""

    def make(name: str = "run", **changes) -> TrainOptions:
        base = {
            "data": (str(voc_root),),
            "input_size": 64,
            "batch_size": 1,
            "iterations": 2,
            "workers": 0,
            "device": "cpu",
            "progress": False,
            "log_every": 1,
            "output": str(tmp_path / name),
        }
        return TrainOptions(**{**base, **changes})

    return make
