"""The issue's acceptance check: each VGG preset at its native input size, exported to ONNX with the
CLI, run by ONNX Runtime at batch 4 and 1 (5 images, --batch-size 4) and verified against PyTorch:
raw outputs within 1e-4 and identical detections."""

import json
import time

import pytest

from model.artifacts import read_manifest
from refinedet.cli import main
from tests.conversion.conftest import make_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def export_and_verify(tmp_path, image_dir, name):
    ckpt, _ = make_checkpoint(tmp_path / f"{name}.pt", name)
    onnx_path = tmp_path / f"{name}.onnx"
    start = time.perf_counter()
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "-o", str(onnx_path)]) == 0
    exported = time.perf_counter()
    assert read_manifest(onnx_path).extra["tracer_warnings"] == []
    report_path = tmp_path / "report.json"
    code = main(
        [
            "verify",
            "--checkpoint",
            str(ckpt),
            "--artifact",
            str(onnx_path),
            "--images",
            str(image_dir),
            "--batch-size",
            "4",
            "--json",
            str(report_path),
        ]
    )
    print(f"{name}: export {exported - start:.1f} s, verify {time.perf_counter() - exported:.1f} s")
    report = json.loads(report_path.read_text())
    print(json.dumps(report["outputs"]), json.dumps(report["agreement"]))
    assert code == 0, report["failures"]
    assert report["images"] == 5 and report["passed"]
    assert [o["name"] for o in report["outputs"]] == ["arm_loc", "arm_conf", "odm_loc", "odm_conf"]
    assert all(o["max_abs"] < 1e-4 for o in report["outputs"])
    a = report["agreement"]
    assert a["reference"] > 0 and a["reference"] == a["candidate"] == a["matched"]  # identical detections
    assert a["max_score_diff"] < 1e-4


def test_refinedet320_vgg16_onnx_verifies(tmp_path, image_dir):
    export_and_verify(tmp_path, image_dir, "refinedet320_vgg16")


@pytest.mark.slow
def test_refinedet512_vgg16_onnx_verifies(tmp_path, image_dir):
    export_and_verify(tmp_path, image_dir, "refinedet512_vgg16")
