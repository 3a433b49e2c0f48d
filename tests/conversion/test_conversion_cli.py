"""`refinedet export ...` / `refinedet verify` end to end: exit codes and messages."""

import json

import pytest

from model.cli import main
from tests.conversion.conftest import make_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def test_export_missing_checkpoint(tmp_path, capsys):
    assert (
        main(["export", "onnx", "--checkpoint", str(tmp_path / "none.pt"), "-o", str(tmp_path / "m.onnx")])
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_export_bad_options(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "-o", out, "--batch", "zero"]) == 2
    assert "--batch must be 'dynamic' or a positive integer" in capsys.readouterr().err
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "-o", out, "--opset", "9"]) == 2
    assert "--opset must be between 11 and 20" in capsys.readouterr().err


def test_export_needs_a_target(capsys):
    with pytest.raises(SystemExit):
        main(["export"])
    assert "TARGET" in capsys.readouterr().err


def test_verify_passes_for_a_fixed_batch_export(tiny_checkpoint, fixed_onnx, image_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "verify",
                "--checkpoint",
                str(tiny_checkpoint),
                "--artifact",
                str(fixed_onnx),
                "--images",
                str(image_dir),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["images"] == 4  # two full batches of the fixed batch 2; the fifth image is left out
    assert data["passed"] and "PASS" in capsys.readouterr().out


def test_verify_fails_for_other_weights(tmp_path, tiny_onnx, image_dir, capsys):
    other, _ = make_checkpoint(
        tmp_path / "other.pt", "refinedet320_vgg16", 64, seed=1
    )  # same config, other weights
    assert (
        main(["verify", "--checkpoint", str(other), "--artifact", str(tiny_onnx), "--images", str(image_dir)])
        == 1
    )
    captured = capsys.readouterr()
    assert "exported from another checkpoint" in captured.err
    assert "FAIL" in captured.out and "max abs diff" in captured.out


def test_verify_refuses_a_different_model(tmp_path, tiny_onnx, image_dir, capsys):
    other, _ = make_checkpoint(tmp_path / "other.pt", "refinedet320_vgg16", 128)
    assert (
        main(["verify", "--checkpoint", str(other), "--artifact", str(tiny_onnx), "--images", str(image_dir)])
        == 2
    )
    assert "describe different models" in capsys.readouterr().err


def test_verify_without_manifest(tmp_path, tiny_checkpoint, image_dir, capsys):
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"onnx")
    assert (
        main(
            [
                "verify",
                "--checkpoint",
                str(tiny_checkpoint),
                "--artifact",
                str(bare),
                "--images",
                str(image_dir),
            ]
        )
        == 2
    )
    assert "no manifest beside" in capsys.readouterr().err


def test_triton_needs_an_onnx_artifact(tmp_path, capsys):
    assert (
        main(["export", "triton", "--onnx", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "repo")]) == 2
    )
    assert "artifact not found" in capsys.readouterr().err
