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
        (["-o", "{tmp}/folder.onnx"], "-o {tmp}/folder.onnx: is a folder; give a file name"),
        (["-o", "{tmp}/manifest.onnx"], "-o {tmp}/manifest.onnx.json: is a folder"),
        (["-o", "{tmp}/afile/m.onnx"], "-o {tmp}/afile/m.onnx: {tmp}/afile is a file, not a folder"),
    ],
)
def test_export_argument_errors_come_before_the_checkpoint_is_read(tmp_path, capsys, extra, message):
    # the checkpoint does not exist: an argument error reported first proves nothing was loaded
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "manifest.onnx.json").mkdir()
    (tmp_path / "afile").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    argv = ["export", "onnx", "--checkpoint", str(tmp_path / "none.pt"), "-o", str(tmp_path / "m.onnx")]
    assert main([*argv, *[a.format(tmp=tmp_path) for a in extra]]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "checkpoint not found" not in err
    assert len(err.splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


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
    assert main(["verify", "--artifact", str(tiny_onnx), "--images", str(image_dir), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "PASS" in captured.out and "verify:" not in captured.err  # --no-progress: no bar


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


def test_a_jpeg_given_as_a_checkpoint_is_one_line(image_dir, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.open(next(image_dir.iterdir())).convert("RGB").save(photo)
    assert main(["export", "onnx", "--checkpoint", str(photo), "-o", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == (
        f"refinedet export: error: {photo} is not a checkpoint (it is a JPEG image)\n"
    )
    assert main(["weights", "inspect", str(photo)]) == 2
    err = capsys.readouterr().err
    assert err == f"refinedet weights: error: {photo}: not a PyTorch state dict (it is a JPEG image)\n"


@pytest.mark.slow  # two INT8 exports: over a minute on 2 busy cores
def test_export_int8_defaults_to_the_shipped_model_and_shows_its_progress(
    tiny_checkpoint, image_dir, tmp_path, monkeypatch, capsys
):
    import model.zoo

    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tiny_checkpoint)  # stands in for the shipped file
    out = tmp_path / "m.int8.onnx"
    argv = ["export", "onnx", "-o", str(out), "--int8", "--calibration-images", str(image_dir),
            "--calibration-method", "minmax"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "INT8: minmax calibration on 5 images" in captured.out
    stages = [
        "export onnx: exporting the FP32 ONNX model (",
        "export onnx: preparing the graph for quantization (",
        "export onnx: calibrating (minmax) on 5 images (",
        "5/5 [",  # the calibration bar, with its total
        "export onnx: choosing the activation ranges and quantizing (",
        "export onnx: checking the INT8 model (",
    ]
    positions = [captured.err.find(stage) for stage in stages]
    assert -1 not in positions and positions == sorted(positions), captured.err
    assert main([*argv, "--no-progress"]) == 0
    assert "export onnx:" not in capsys.readouterr().err


def test_export_targets_check_their_outputs_before_working(
    tiny_checkpoint, tiny_onnx, image_dir, tmp_path, capsys
):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        (["export", "triton", "--onnx", str(tiny_onnx), "-o", str(afile)], f"-o {afile}: is a file, not a folder"),
        (["export", "int8-ranges", "--checkpoint", str(tiny_checkpoint), "--calibration-images", str(image_dir),
          "-o", str(tmp_path / "folder")], f"-o {tmp_path / 'folder'}: is a folder"),
        (["weights", "convert-hed", "--h5", str(tmp_path / "none.h5"), "-o", str(tmp_path / "folder")],
         f"-o {tmp_path / 'folder'}: is a folder"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_engine_options_check_the_output_files_without_tensorrt(tiny_onnx, tmp_path):
    import argparse

    from conversion.cli import engine_options
    from model.errors import UserError

    (tmp_path / "folder").mkdir()
    base = {"onnx": tiny_onnx, "output": tmp_path / "m.plan", "precision": "fp16", "calibration_images": None,
            "calibration_split": "train", "calibration_cache": None, "calibration_batch_size": 8,
            "calibration_max_images": 512, "min_batch": None, "opt_batch": None, "max_batch": None,
            "workspace": None, "timing_cache": None}  # fmt: skip
    assert engine_options(argparse.Namespace(**base)).precision == "fp16"
    for key in ("output", "calibration_cache", "timing_cache"):
        with pytest.raises(UserError, match="folder: is a folder; give a file name"):
            engine_options(argparse.Namespace(**{**base, key: tmp_path / "folder"}))


def test_verify_checks_max_images_and_json_before_loading(tiny_onnx, image_dir, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    base = ["verify", "--checkpoint", str(tmp_path / "none.pth"), "--artifact", str(tiny_onnx),
            "--images", str(image_dir)]  # fmt: skip
    for extra, message in [
        (["--max-images", "0"], "--max-images must be at least 1, got 0"),
        (["--max-images", "-3"], "--max-images must be at least 1, got -3"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--json", str(tmp_path / "folder")], f"--json {tmp_path / 'folder'}: is a folder"),
    ]:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "checkpoint not found" not in err, err


def test_verify_shows_a_bar_over_the_images(tiny_checkpoint, tiny_onnx, image_dir, capsys):
    argv = ["verify", "--checkpoint", str(tiny_checkpoint), "--artifact", str(tiny_onnx), "--images",
            str(image_dir), "--max-images", "3", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "verify: 100%" in captured.err and "3/3 [" in captured.err  # images, not batches
    assert "vs PyTorch on 3 images" in captured.out
