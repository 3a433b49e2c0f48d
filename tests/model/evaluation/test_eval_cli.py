"""`refinedet predict` and `refinedet eval` end to end on tiny synthetic files (and BCCD when slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import UserError
from model.evaluation import cli


def run_cli(argv: list[str]) -> int:
    """Parse as `refinedet` does and run the handler (a UserError is raised, not printed)."""
    from refinedet.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.handler(args)


@pytest.fixture(autouse=True)
def predict_on_torch(monkeypatch):
    """`predict` with a checkpoint runs the checkpoint eagerly here (REFINEDET_BACKEND=torch): these tests are
    about rows, resume and errors; the CPU engine decision it otherwise makes is tested in tests/deploy."""
    monkeypatch.setenv("REFINEDET_BACKEND", "torch")


@pytest.fixture
def images(tmp_path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    a = tmp_path / "in" / "one.jpg"
    b = tmp_path / "in" / "two.png"
    a.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (100, 70, 4), dtype=np.uint8), mode="RGBA").save(b)
    return [a, b]


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]


def test_predict_writes_jsonl_and_annotated_images(tiny_checkpoint, images, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), *map(str, images), "--output", str(out)]
    assert run_cli([*argv, "--score-threshold", "0.0", "--device", "cpu", "--no-progress", "--annotate"]) == 0
    rows = read_rows(out)
    assert [Path(r["file"]).name for r in rows] == ["one.jpg", "two.png"]
    assert [(r["width"], r["height"]) for r in rows] == [(90, 60), (70, 100)]
    run = json.loads((out / "run.json").read_text())
    assert run["class_names"] == ["a", "b"] and run["score_threshold"] == 0.0
    for entry, src in zip(rows, images, strict=True):
        dets = entry["detections"]
        assert dets, "a random model with threshold 0 detects something"
        assert {d["class_id"] for d in dets} <= {0, 1}
        for d in dets:
            assert d["label"] == ("a", "b")[d["class_id"]]  # class_id: 0-based index into class_names
            b = d["box"]
            assert 0 <= b["x1"] <= b["x2"] <= entry["width"] and 0 <= b["y1"] <= b["y2"] <= entry["height"]
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        annotated = Image.open(out / "annotated" / entry["annotated"])
        assert annotated.size == (entry["width"], entry["height"])
        original = np.asarray(Image.open(src).convert("RGB"), dtype=np.int16)
        assert np.abs(np.asarray(annotated, dtype=np.int16) - original).mean() > 2  # boxes were drawn
    assert "2 images in" in capsys.readouterr().out

    with pytest.raises(UserError, match="other settings \\(score_threshold\\)"):
        run_cli([*argv, "--score-threshold", "0.4", "--no-progress", "--annotate"])
    assert run_cli([*argv, "--score-threshold", "0.4", "--no-progress", "--overwrite"]) == 0
    high = read_rows(out)
    assert len(high) == 2 and all(d["score"] > 0.4 for i in high for d in i["detections"])
    assert sum(len(i["detections"]) for i in high) < sum(len(i["detections"]) for i in rows)


def test_predict_user_errors(tiny_checkpoint, images, tmp_path):
    with pytest.raises(UserError, match="no such image file or folder"):
        run_cli(["predict", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "nope.jpg")])
    with pytest.raises(UserError, match="checkpoint not found"):
        run_cli(["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(images[0])])
    with pytest.raises(UserError, match="score-threshold"):
        run_cli(["predict", "--checkpoint", str(tiny_checkpoint), str(images[0]), "--score-threshold", "1.5"])
    with pytest.raises(UserError, match="unknown device"):
        run_cli(["predict", "--checkpoint", str(tiny_checkpoint), str(images[0]), "--device", "banana"])
    with pytest.raises(UserError, match="--list FILE"):
        run_cli(["predict", "--checkpoint", str(tiny_checkpoint)])


@pytest.mark.parametrize("metric", ["voc07", "voc12", "coco"])
def test_eval_end_to_end_on_a_voc_tree(tiny_checkpoint, voc_tree, tmp_path, capsys, metric):
    out = tmp_path / f"eval-{metric}"
    argv = [
        "eval",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(voc_tree),
        "--split",
        "test",
        "--metric",
        metric,
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "a " in printed and "b " in printed and "mAP" in printed and "images in" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["metric"] == metric and result["split"] == "test" and result["num_images"] == 3
    assert set(result["per_class"]) == {"a", "b"}
    assert result["mAP"] is None or 0.0 <= result["mAP"] <= 1.0
    assert len(result["checkpoint_sha256"]) == 64 and result["seconds"] > 0
    if metric != "coco":
        assert result["num_positives"] == {"a": 3, "b": 2}  # one "b" box is difficult
    assert sorted(p.name for p in out.glob("pr_*.png")) == ["pr_a.png", "pr_b.png"]


def test_eval_user_errors(tiny_checkpoint, voc_tree, tmp_path):
    base = ["eval", "--checkpoint", str(tiny_checkpoint)]
    with pytest.raises(UserError, match="--data"):
        run_cli(base)
    with pytest.raises(UserError, match="not a folder"):
        run_cli([*base, "--data", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="either"):
        run_cli([*base, "--data", str(voc_tree), "--coco-images", str(tmp_path)])
    with pytest.raises(UserError, match="go together"):
        run_cli([*base, "--coco-images", str(tmp_path)])
    with pytest.raises(UserError, match="batch-size"):
        run_cli([*base, "--data", str(voc_tree), "--batch-size", "0"])
    with pytest.raises(UserError, match="device"):
        run_cli([*base, "--data", str(voc_tree), "--device", "potato"])


def test_eval_defaults_to_the_shipped_model(tiny_checkpoint, voc_tree, tmp_path, monkeypatch):
    import hashlib

    import model.zoo

    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tiny_checkpoint)  # stands in for the shipped file
    out = tmp_path / "eval"
    argv = ["eval", "--data", str(voc_tree), "--output", str(out), "--device", "cpu", "--no-progress"]
    assert run_cli(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["checkpoint"] == str(tiny_checkpoint)
    assert result["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()

    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tmp_path / "absent.pth.xz")
    with pytest.raises(UserError, match="--checkpoint or --artifact"):
        run_cli(argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "nowhere"], "--data nowhere: not a folder"),
        ([], "give --data ROOT"),
        (["--data", ".", "--device", "banana"], "unknown device 'banana'"),
    ],
)
def test_eval_argument_errors_come_before_the_model_loads(tmp_path, extra, message):
    # the checkpoint does not exist: an argument error reported first proves nothing was loaded
    with pytest.raises(UserError, match=message):
        run_cli(["eval", "--checkpoint", str(tmp_path / "missing.pth"), *extra])


@pytest.mark.slow
def test_eval_on_bccd_with_a_random_refinedet320(bccd, tmp_path, capsys):
    """The real BCCD test split (72 images) through a randomly initialised refinedet320_vgg16."""
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.network import build_model

    torch.manual_seed(0)
    model = build_model(preset("refinedet320_vgg16", class_names=("RBC", "WBC", "Platelets")))
    ckpt = save_checkpoint(tmp_path / "bccd_random.pt", model)
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(bccd),
        "--split",
        "test",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert run_cli(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["num_images"] == 72 and set(result["per_class"]) == {"RBC", "WBC", "Platelets"}
    assert all(n > 0 for n in result["num_positives"].values())
    assert 0.0 <= result["mAP"] < 0.5  # an untrained network is far from useful


@pytest.mark.slow
def test_a_checkpoint_from_refinedet_train_is_evaluated_on_bccd(bccd, tmp_path):
    """`refinedet train` (1 iteration, input 64) writes last.pth; `refinedet eval` reads it back."""
    from model.training import cli as train_cli

    parser = argparse.ArgumentParser(prog="refinedet")
    sub = parser.add_subparsers(dest="command")
    train_cli.register(sub)
    cli.register(sub)
    run = tmp_path / "run"
    train = [
        "train",
        "--data",
        str(bccd),
        "--split",
        "train",
        "--classes",
        "RBC",
        "WBC",
        "Platelets",
        "--input-size",
        "64",
        "--iterations",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--output",
        str(run),
        "--no-progress",
    ]
    args = parser.parse_args(train)
    assert (args.handler(args) or 0) == 0
    checkpoint = run / "last.pth"
    out = tmp_path / "eval"
    args = parser.parse_args(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(bccd),
            "--split",
            "test",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert args.handler(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["num_images"] == 72 and result["input_size"] == 64
    assert list(result["per_class"]) == ["RBC", "WBC", "Platelets"]


def test_predict_resumes_whatever_the_paths_look_like(tiny_checkpoint, images, tmp_path, capsys, monkeypatch):
    """Files are keyed by their absolute path and the model by its sha256: a rerun from another working
    directory, with a relative folder and a copy of the checkpoint, skips everything already done."""
    import shutil

    out = tmp_path / "pred"
    first = [
        "predict",
        "--checkpoint",
        str(tiny_checkpoint),
        str(images[0]),
        "--output",
        str(out),
        "--no-progress",
    ]
    assert run_cli(first) == 0
    copy = shutil.copy(tiny_checkpoint, tmp_path / "copy.pth")
    monkeypatch.chdir(images[0].parent.parent)
    assert run_cli(["predict", "--checkpoint", str(copy), "in", "--output", str(out), "--no-progress"]) == 0
    assert "1 images in" in capsys.readouterr().out.splitlines()[-1]  # two.png only; one.jpg was done
    assert [Path(r["file"]) for r in read_rows(out)] == images


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading its model."""

    def refuse(args):
        raise AssertionError("the model was loaded before the error was reported")

    monkeypatch.setattr(cli, "load_evaluated", refuse)


def test_predict_refuses_a_file_as_output_before_the_model_loads(
    tiny_checkpoint, images, tmp_path, no_model_load
):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    with pytest.raises(UserError, match=r"^--output .*taken: is a file, not a folder"):
        run_cli(["predict", "--checkpoint", str(tiny_checkpoint), str(images[0]), "--output", str(taken)])
    assert taken.read_text() == "not a folder"


def test_predict_on_an_empty_folder_fails_before_the_model_loads(tiny_checkpoint, tmp_path, no_model_load):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    out = tmp_path / "pred"
    with pytest.raises(
        UserError, match=r"^no images found in .*empty \(looked for .*jpg.*in subfolders too\)$"
    ):
        run_cli(
            ["predict", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "empty"), "--output", str(out)]
        )
    empty_list = tmp_path / "list.txt"
    empty_list.write_text("# nothing yet\n")
    with pytest.raises(UserError, match=r"^no images found in --list .*list\.txt"):
        run_cli(
            ["predict", "--checkpoint", str(tiny_checkpoint), "--list", str(empty_list), "--output", str(out)]
        )
    assert not out.exists()  # nothing was written


def test_predict_defaults_to_the_shipped_model_and_its_bar_has_a_total(
    tiny_checkpoint, images, tmp_path, capsys, monkeypatch
):
    import model.zoo

    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tiny_checkpoint)  # stands in for the shipped file
    out = tmp_path / "pred"
    listing = tmp_path / "images.txt"
    listing.write_text(f"{images[1]}\n")
    assert (
        run_cli(["predict", str(images[0]), "--list", str(listing), "--output", str(out), "--device", "cpu"])
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint_path"] == str(tiny_checkpoint) and len(read_rows(out)) == 2
    captured = capsys.readouterr()
    assert "2/2 [" in captured.err  # tqdm with a total: "n/total [elapsed<remaining"
    assert "2 images in" in captured.out

    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tmp_path / "absent.pth.xz")
    with pytest.raises(UserError, match="--checkpoint or --artifact"):
        run_cli(["predict", str(images[0]), "--output", str(tmp_path / "other")])


def test_a_finished_run_resumes_without_loading_the_model(
    tiny_checkpoint, images, tmp_path, capsys, monkeypatch
):
    argv = [
        "predict",
        "--checkpoint",
        str(tiny_checkpoint),
        *map(str, images),
        "--output",
        str(tmp_path / "p"),
    ]
    assert run_cli([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(
        cli, "load_evaluated", lambda args: pytest.fail("nothing to do, yet the model loaded")
    )
    assert run_cli([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("0 images to do, 2 already done")


def test_listed_inputs_counts_up_to_a_limit_then_streams(images, tmp_path):
    folder = str(images[0].parent)
    assert cli.listed_inputs([folder], []) == [str(images[0]), str(images[1])]
    streamed = cli.listed_inputs([folder, folder], [], limit=3)  # 4 paths: over the limit
    assert not isinstance(streamed, list)
    assert list(streamed) == [str(images[0]), str(images[1])] * 2


def test_eval_refuses_a_file_as_output_before_evaluating(tiny_checkpoint, voc_tree, tmp_path, no_model_load):
    taken = tmp_path / "taken"
    taken.write_text("x")
    base = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(voc_tree), "--no-progress"]
    with pytest.raises(UserError, match=r"^--output .*taken: is a file, not a folder"):
        run_cli([*base, "--output", str(taken)])
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^--output .*results\.json: is a folder"):
        run_cli([*base, "--output", str(tmp_path / "out")])


def test_eval_checks_its_default_output_too(tiny_checkpoint, voc_tree, tmp_path, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the default output folder's parent goes")
    with pytest.raises(
        UserError, match=r"^--output runs/eval/tiny-test-voc07: .*runs is a file, not a folder$"
    ):
        run_cli(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(voc_tree)])
