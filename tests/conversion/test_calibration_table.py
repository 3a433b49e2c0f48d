"""INT8 from a stored ranges table (conversion.calibration_table), on the tiny random RefineDet: the
table gives the same INT8 model as calibrating on the images it was made from, and a table that does
not fit (another checkpoint, missing tensors) is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conversion.calibration_table import (
    TABLE_FORMAT,
    build_table,
    quantize_with_table,
    read_table,
    table_path_for,
)
from conversion.quantize import QuantizeOptions, quantize_onnx
from conversion.verify import image_batches, image_files
from model.artifacts import read_manifest
from model.errors import UserError
from model.runtime import load_runner

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_checkpoint, image_dir):
    path = tmp_path_factory.mktemp("table") / "tiny.int8-ranges.json"
    options = QuantizeOptions(files=tuple(image_files(image_dir)), source="test images")
    build_table(tiny_checkpoint, path, options)
    return path


def test_the_table_is_small_json_of_ranges_for_its_checkpoint(table, tiny_checkpoint):
    data = read_table(table)
    assert data["format"] == TABLE_FORMAT and data["quantize"]["method"] == "entropy"
    assert len(data["ranges"]) > 20 and all(lo <= hi for lo, hi in data["ranges"].values())
    assert data["calibration"]["images"] == 5 and table.stat().st_size < 50_000
    with pytest.raises(UserError, match="another checkpoint"):
        read_table(table, checkpoint_sha256="0" * 64)


@pytest.mark.slow
def test_quantizing_from_the_table_equals_calibrating_on_the_images(table, tiny_onnx, image_dir, tmp_path):
    from_images, from_table = tmp_path / "images.onnx", tmp_path / "table.onnx"
    quantize_onnx(tiny_onnx, from_images, QuantizeOptions(files=tuple(image_files(image_dir)), source="x"))
    manifest = quantize_with_table(tiny_onnx, from_table, table)
    assert manifest.precision == "int8" and read_manifest(from_table).precision == "int8"
    assert manifest.extra["int8"]["calibration"]["ranges_table"] == table.name
    a, b = load_runner(from_images), load_runner(from_table)
    for batch in image_batches(image_files(image_dir), a.config.input_size, a.config.normalization, 2):
        for x, y in zip(a(batch), b(batch), strict=True):
            assert torch.equal(x, y)


def test_a_table_missing_tensors_of_the_graph_is_refused(table, tiny_onnx, tmp_path):
    data = json.loads(table.read_text())
    dropped = sorted(data["ranges"])[len(data["ranges"]) // 2]
    del data["ranges"][dropped]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(UserError, match="has no range for 1 tensors"):
        quantize_with_table(tiny_onnx, tmp_path / "out.onnx", broken)
    assert not (tmp_path / "out.onnx").exists()


def test_the_table_sits_beside_its_checkpoint():
    assert table_path_for(Path("m/a.pth.xz")) == Path("m/a.int8-ranges.json")
    assert table_path_for(Path("b.pt")) == Path("b.int8-ranges.json")
