"""`refinedet eval --artifact`: an exported model scored through the same path as its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from model.errors import UserError
from model.evaluation.artifact import load_artifact_network
from tests.model.evaluation.test_eval_cli import run_cli

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


@pytest.fixture(scope="module")
def fixed_batch_onnx(tiny_model, tmp_path_factory):
    """The tiny model exported with a fixed batch of 2 (so an odd image count needs padding)."""
    from conversion.onnx_export import export_model

    path = tmp_path_factory.mktemp("onnx") / "tiny_b2.onnx"
    export_model(tiny_model, path, batch=2)
    return path


def evaluate(source: list[str], voc_tree, out) -> dict:
    argv = ["eval", *source, "--data", str(voc_tree), "--output", str(out), "--batch-size", "3",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert run_cli(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_an_onnx_export_scores_like_its_checkpoint(tiny_checkpoint, fixed_batch_onnx, voc_tree, tmp_path):
    reference = evaluate(["--checkpoint", str(tiny_checkpoint)], voc_tree, tmp_path / "ckpt")
    exported = evaluate(["--artifact", str(fixed_batch_onnx)], voc_tree, tmp_path / "onnx")
    assert exported["num_images"] == reference["num_images"] == 3  # batches of 3 -> calls of 2 + 1 padded
    assert exported["per_class"] == reference["per_class"] and exported["mAP"] == reference["mAP"]
    assert exported["precision"] == "fp32" and exported["artifact_kind"] == "onnx"
    assert len(exported["artifact_sha256"]) == 64 and "checkpoint" not in exported


def test_the_artifact_network_pads_a_fixed_batch_and_keeps_the_input_size(tiny_model, fixed_batch_onnx):
    network = load_artifact_network(fixed_batch_onnx, torch.device("cpu"))
    images = torch.randn(3, 3, 64, 64) * 60
    with torch.no_grad():
        expected = tiny_model(images)
    got = network(images)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="runs at its input size 64 only"):
        network(torch.zeros(1, 3, 128, 128))


def test_artifact_user_errors(tiny_checkpoint, fixed_batch_onnx, voc_tree):
    with pytest.raises(UserError, match="--multiscale needs --checkpoint"):
        run_cli(["eval", "--artifact", str(fixed_batch_onnx), "--data", str(voc_tree), "--multiscale"])
    with pytest.raises(SystemExit):  # argparse: not allowed with
        run_cli(["eval", "--artifact", str(fixed_batch_onnx), "--checkpoint", str(tiny_checkpoint)])


class MinBatchEngine:
    """Stands in for a TensorRT engine built with ``--min-batch 2 --max-batch 4`` (no TensorRT here): an
    ``ArtifactRunner`` whose engine call refuses any batch outside [2, 4] and otherwise runs the model."""

    @staticmethod
    def runner(model, onnx_path):
        import dataclasses

        from model.artifacts import read_manifest
        from model.runtime import ArtifactRunner

        class Runner(ArtifactRunner):
            def run_batch(self, images):
                assert self.min_batch <= images.shape[0] <= self.max_batch, images.shape
                self.calls.append(images.shape[0])
                with torch.no_grad():
                    return list(model(images))

        manifest = dataclasses.replace(read_manifest(onnx_path), batch=None)
        runner = Runner(manifest, torch.device("cpu"))
        runner.min_batch, runner.max_batch, runner.calls = 2, 4, []
        return runner


def test_eval_on_a_min_batch_engine_pads_the_odd_last_batch(tiny_model, fixed_batch_onnx, voc_tree):
    """What `refinedet eval --artifact engine.plan` does with an engine built with --min-batch 2: 3 images
    in batches of 2 end with a batch of 1, padded up to 2, and the scores equal the checkpoint's. A batch
    above the engine's max is cut into calls."""
    from model.data.voc import VOCDetection
    from model.evaluation.artifact import ArtifactNetwork
    from model.evaluation.runner import evaluate_voc

    dataset = VOCDetection([voc_tree], "test", class_names=tiny_model.config.class_names, keep_difficult=True)
    reference = evaluate_voc(tiny_model, dataset, batch_size=2, progress=False)
    runner = MinBatchEngine.runner(tiny_model, fixed_batch_onnx)
    got = evaluate_voc(ArtifactNetwork(runner), dataset, batch_size=2, progress=False)
    assert runner.calls == [2, 2]  # 3 images in batches of 2: the odd last one padded to the minimum
    assert got["per_class"] == reference["per_class"] and got["mAP"] == reference["mAP"]
    runner.calls.clear()
    images = torch.randn(5, 3, 64, 64) * 60
    with torch.no_grad():
        expected = tiny_model(images)
    for a, b in zip(expected, ArtifactNetwork(runner)(images), strict=True):  # 4, then 1 padded to 2
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert runner.calls == [4, 2]


def test_predict_with_an_artifact_gives_the_checkpoint_rows(
    tiny_checkpoint, fixed_batch_onnx, voc_tree, tmp_path, monkeypatch
):
    """`refinedet predict --artifact` runs the ONNX model through the same rows as the checkpoint (the
    checkpoint run by torch here: REFINEDET_BACKEND=torch)."""
    from tests.model.evaluation.test_eval_cli import read_rows

    folder = voc_tree / "JPEGImages"
    rows = {}
    for flag, path in (("--checkpoint", tiny_checkpoint), ("--artifact", fixed_batch_onnx)):
        if flag == "--checkpoint":
            monkeypatch.setenv("REFINEDET_BACKEND", "torch")
        else:
            monkeypatch.delenv("REFINEDET_BACKEND")
        out = tmp_path / flag.strip("-")
        argv = ["predict", flag, str(path), str(folder), "--output", str(out), "--score-threshold", "0.05"]
        assert run_cli([*argv, "--device", "cpu", "--no-progress", "--batch-size", "3"]) == 0
        rows[flag] = read_rows(out)
    assert len(rows["--artifact"]) == len(rows["--checkpoint"]) == 3
    for a, b in zip(rows["--artifact"], rows["--checkpoint"], strict=True):
        assert a["file"] == b["file"] and len(a["detections"]) == len(b["detections"])
        for x, y in zip(a["detections"], b["detections"], strict=True):
            assert x["class_id"] == y["class_id"] and abs(x["score"] - y["score"]) < 1e-3
    assert sum(len(r["detections"]) for r in rows["--artifact"]) > 0
