"""`refinedet export ...` / `refinedet verify` end to end: exit codes and messages."""

import json

import pytest

from refinedet.cli import main
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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--opset", "25"], "--opset must be between 11 and 20"),
        (["-o", "x.txt"], "an ONNX model's file name ends in .onnx (e.g. x.onnx)"),
    ],
)
def test_export_argument_errors_come_before_the_checkpoint_is_read(tmp_path, capsys, extra, message):
    # the checkpoint does not exist: an argument error reported first proves nothing was loaded
    argv = ["export", "onnx", "--checkpoint", str(tmp_path / "none.pt"), "-o", str(tmp_path / "m.onnx")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "checkpoint not found" not in err
    assert list(tmp_path.iterdir()) == []


def test_verify_errors_are_one_line(tiny_checkpoint, tiny_onnx, image_dir, tmp_path, capsys):
    bad = tmp_path / "images"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    base = ["verify", "--checkpoint", str(tiny_checkpoint), "--artifact", str(tiny_onnx)]
    assert main([*base, "--images", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg is not a readable image" in err and "Traceback" not in err
    assert main([*base, "--images", str(image_dir), "--device", "banana"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'banana'" in err and "Traceback" not in err
    # argument errors come before the checkpoint is read (it does not exist here)
    missing = ["verify", "--checkpoint", str(tmp_path / "none.pth"), "--artifact", str(tiny_onnx)]
    assert main([*missing, "--images", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--images must be a directory" in err and "checkpoint not found" not in err


def test_verify_defaults_to_the_shipped_model(tiny_checkpoint, tiny_onnx, image_dir, monkeypatch, capsys):
    import model.zoo

    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tiny_checkpoint)  # stands in for the shipped file
    assert main(["verify", "--artifact", str(tiny_onnx), "--images", str(image_dir)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_export_int8_option_errors_are_clear_and_come_before_the_export(
    tiny_checkpoint, image_dir, tmp_path, capsys
):
    out = tmp_path / "m.onnx"
    base = ["export", "onnx", "--checkpoint", str(tiny_checkpoint), "-o", str(out)]
    cases = [
        (["--int8"], "--int8 needs --calibration-images"),
        (["--calibration-images", str(image_dir)], "--calibration-images only applies with --int8"),
        (["--calibration-method", "minmax"], "--calibration-method only applies with --int8"),
        (["--int8", "--calibration-images", str(tmp_path / "none")], "not a folder of images or a VOC-layout root"),
        (["--int8", "--calibration-images", str(image_dir), "--calibration-method", "kl"],
         "--calibration-method must be one of entropy, minmax, percentile"),
        (["--int8", "--calibration-images", str(image_dir), "--calibration-max-images", "0"],
         "--calibration-max-images must be >= 1"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, extra
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:VOC voc.*classes not in class_names")  # the tree's a/b vs cell/platelet
def test_export_int8_then_eval_and_verify_the_artifact(tiny_checkpoint, tmp_path, capsys):
    """`export onnx --int8 --outputs decoded` on a VOC root's train split, then `eval --artifact` on its
    test split (the decoded-graph branch of evaluation) and `verify` against the checkpoint (random
    weights: only that everything runs and reports with the INT8 tolerances)."""
    from model.artifacts import read_manifest
    from tests.model.evaluation.conftest import write_voc_tree

    voc = write_voc_tree(tmp_path / "voc", split="train", n=4)
    write_voc_tree(voc, split="test", n=3, seed=1)
    out = tmp_path / "m.int8.onnx"
    argv = ["export", "onnx", "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--int8",
            "--calibration-images", str(voc), "--calibration-method", "minmax", "--outputs", "decoded"]  # fmt: skip
    assert main(argv) == 0
    assert "INT8: minmax calibration on 4 images of" in capsys.readouterr().out
    evaluation = tmp_path / "eval"
    argv = ["eval", "--artifact", str(out), "--data", str(voc), "--output", str(evaluation), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((evaluation / "results.json").read_text())
    assert result["precision"] == "int8" and result["num_images"] == 3 and result["device"] == "cpu"
    assert read_manifest(out).outputs == "decoded"
    report = tmp_path / "verify.json"
    argv = ["verify", "--checkpoint", str(tiny_checkpoint), "--artifact", str(out), "--images",
            str(voc / "JPEGImages"), "--json", str(report)]  # fmt: skip
    assert main(argv) in (0, 1)
    assert json.loads(report.read_text())["tolerance"]["match_iou"] == 0.9


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
    assert data["images"] == 5  # calls of the fixed batch 2: the fifth image's call is padded
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
