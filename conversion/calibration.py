"""INT8 calibration: which images (``calibration_files``: a folder, or a split of a VOC-layout data
set), image batches from the project's own preprocessing (``calibration_batches``, shared by the
TensorRT builder and the ONNX Runtime quantizer in ``conversion.quantize``), and for TensorRT the
``IInt8EntropyCalibrator2`` that feeds them to the builder with a calibration cache.

Why implicit (calibrator-based) INT8 and not explicit Q/DQ: see docs/export.md. In short, TensorRT
10.x still supports it (deprecated since 10.1, removed in 11), it needs no extra toolchain (Q/DQ
needs NVIDIA ModelOpt or pytorch-quantization to insert and calibrate the nodes in the ONNX graph),
and it calibrates on exactly the tensors ``model.preprocess`` produces in serving.

``calibration_batches`` is pure torch (tested here); ``make_calibrator`` needs TensorRT and a GPU
and has NEVER RUN on the machines this project was developed on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from model.artifacts import atomic_write_bytes
from model.config import RefineDetConfig
from model.errors import UserError


def calibration_files(source: str | Path, split: str = "train", max_images: int | None = None) -> list[Path]:
    """The calibration images: ``source`` is a VOC-layout root (``ImageSets/Main/<split>.txt`` lists
    the ids in ``JPEGImages/``) or a folder of images. More than ``max_images`` are thinned to
    ``max_images`` spread evenly over the sorted list (deterministic)."""
    from conversion.verify import image_files

    root = Path(source)
    if not root.is_dir():
        raise UserError(f"--calibration-images {root}: not a folder of images or a VOC-layout root")
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if (root / "JPEGImages").is_dir():
        if not ids_file.is_file():
            raise UserError(f"{root} is a VOC-layout root without the split {ids_file.relative_to(root)}")
        files = [
            voc_image(root / "JPEGImages", line.split()[0])
            for line in ids_file.read_text().splitlines()
            if line.strip()
        ]
    else:
        files = image_files(root)
    if max_images is not None:
        if max_images < 1:
            raise UserError(f"--calibration-max-images must be >= 1, got {max_images}")
        if len(files) > max_images:
            files = [files[i * len(files) // max_images] for i in range(max_images)]
    return files


def voc_image(directory: Path, image_id: str) -> Path:
    """``directory/<image_id>.jpg`` (or .jpeg / .png)."""
    for suffix in (".jpg", ".jpeg", ".png"):
        if (path := directory / f"{image_id}{suffix}").is_file():
            return path
    raise UserError(f"no image for id {image_id!r} in {directory}")


def calibration_batches(
    files: Sequence[Path], config: RefineDetConfig, batch_size: int, max_batches: int | None = None
) -> Iterator[Tensor]:
    """Full batches of float32 Tensor[batch_size, 3, S, S], preprocessed exactly as in serving.

    TensorRT asks for ``get_batch_size()`` images every time, so a last partial batch is dropped;
    fewer files than one batch is an error.
    """
    from model.preprocess import load_image, preprocess

    if batch_size < 1:
        raise UserError(f"calibration batch size must be >= 1, got {batch_size}")
    n_full = len(files) // batch_size
    if n_full == 0:
        raise UserError(f"INT8 calibration needs at least {batch_size} images, found {len(files)}")
    if max_batches is not None:
        n_full = min(n_full, max_batches)
    for b in range(n_full):
        chunk = files[b * batch_size : (b + 1) * batch_size]
        images = [load_image(f) for f in chunk]
        yield preprocess(images, config.input_size, config.normalization).contiguous()


def make_calibrator(
    trt, batches: Iterator[Tensor], batch_size: int, cache_path: Path | None, device: str = "cuda"
):
    """An ``IInt8EntropyCalibrator2`` over ``batches`` (CPU tensors, copied to ``device`` one at a
    time). With an existing ``cache_path`` TensorRT reads the scales from it and asks for no batches;
    after calibrating it writes the cache there (atomically)."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()  # the pybind base must be initialised explicitly
            self._batches = batches
            self._current: Tensor | None = None  # keeps the device buffer alive until the next call

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None  # calibration finished
            self._current = batch.to(device, torch.float32).contiguous()
            torch.cuda.synchronize()
            return [self._current.data_ptr()]

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            if cache_path is not None:
                atomic_write_bytes(cache_path, bytes(cache))

    return EntropyCalibrator()
