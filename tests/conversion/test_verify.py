import math

import pytest
import torch

from conversion.verify import (
    TOLERANCES,
    Agreement,
    OutputDiff,
    VerifyReport,
    image_batches,
    image_files,
    match_detections,
    verify_artifact,
)
from model.checkpoint import load_model
from model.errors import UserError
from model.network import RefineDetOutput
from model.postprocess import Detections
from model.runtime.onnxruntime import OnnxRuntimeRunner


def dets(rows, width=4):
    """rows: [(x1, y1, x2, y2, score, label)] for one image, padded to ``width``."""
    boxes, scores, labels = (
        torch.zeros(1, width, 4),
        torch.zeros(1, width),
        torch.zeros(1, width, dtype=torch.long),
    )
    for i, (x1, y1, x2, y2, s, label) in enumerate(rows):
        boxes[0, i] = torch.tensor([x1, y1, x2, y2])
        scores[0, i], labels[0, i] = s, label
    return Detections(boxes, scores, labels)


A = (0.1, 0.1, 0.5, 0.5)
B = (0.6, 0.6, 0.9, 0.9)


def match(ref, cand, keep_top_k=4, margin=1e-4):
    return match_detections(dets(ref), dets(cand), keep_top_k, 0.01, margin)


def test_identical_detections_all_match():
    a = match([(*A, 0.9, 1), (*B, 0.5, 2)], [(*A, 0.9, 1), (*B, 0.5, 2)])
    assert (a.reference, a.candidate, a.matched, a.rate, a.max_score_diff) == (2, 2, 2, 1.0, 0.0)


def test_other_class_or_moved_box_does_not_match():
    a = match([(*A, 0.9, 1), (*B, 0.5, 2)], [(*A, 0.9, 2), (0.6, 0.6, 0.9, 0.95, 0.5, 2)])
    assert a.matched == 0 and a.rate == 0.0


def test_score_difference_is_reported():
    a = match([(*A, 0.9, 1)], [(*A, 0.85, 1)])
    assert a.matched == 1 and a.max_score_diff == pytest.approx(0.05)


def test_detection_at_the_selection_boundary_is_borderline_not_a_failure():
    # keep_top_k = 2 is full: the lowest kept score (0.3) is the boundary; 0.30002 flipping out is excused.
    ref = [(*A, 0.9, 1), (*B, 0.30002, 2)]
    cand = [(*A, 0.9, 1), (0.0, 0.0, 0.2, 0.2, 0.30001, 1)]
    a = match(ref, cand, keep_top_k=2)
    assert a.matched == 1 and a.borderline_reference == 1 and a.borderline_candidate == 1 and a.rate == 1.0
    strict = match(ref, cand, keep_top_k=2, margin=0.0)
    assert strict.borderline_reference == 0 and strict.rate == 0.5


def report(max_abs=0.0, mean_abs=0.0, agreement=None, precision="fp32"):
    agreement = agreement or Agreement(reference=10, candidate=10, matched=10)
    return VerifyReport(
        "m.onnx", precision, 2, TOLERANCES[precision], [OutputDiff("odm_conf", max_abs, mean_abs)], agreement
    )


def test_report_passes_within_tolerance():
    r = report(5e-5, 1e-6)
    assert r.passed and "PASS" in r.format() and r.to_dict()["passed"] is True


@pytest.mark.parametrize(
    ("rep", "message"),
    [
        (report(2e-4), "max abs diff"),
        (report(1e-5, 2e-5), "mean abs diff"),
        (report(math.nan), "max abs diff nan"),
        (report(agreement=Agreement(reference=10, candidate=10, matched=9)), "agreement 0.9"),
        (report(agreement=Agreement(reference=1, candidate=1, matched=1, max_score_diff=0.01)), "score diff"),
    ],
)
def test_report_fails_beyond_tolerance(rep, message):
    assert not rep.passed
    assert any(message in f for f in rep.failures()), rep.failures()
    assert "FAIL" in rep.format()


def test_lower_precisions_are_looser():
    assert report(1e-2, 1e-3, precision="fp16").passed
    assert not report(1e-2, 1e-3, precision="fp32").passed
    assert TOLERANCES["int8"].raw_max_abs > TOLERANCES["fp16"].raw_max_abs > TOLERANCES["fp32"].raw_max_abs


class Perturbed:
    """Wraps a runner and adds noise to odm_conf: verification must notice."""

    def __init__(self, runner, noise):
        self.__dict__.update(runner.__dict__)
        self._runner, self._noise = runner, noise

    def __call__(self, images):
        out = self._runner(images)
        return RefineDetOutput(out.arm_loc, out.arm_conf, out.odm_loc, out.odm_conf + self._noise)


def test_verify_artifact_passes_for_the_export(tiny_onnx, tiny_checkpoint, image_dir):
    model, _ = load_model(tiny_checkpoint)
    runner = OnnxRuntimeRunner(tiny_onnx)
    batches = image_batches(image_files(image_dir), 64, model.config.normalization, 4)
    rep = verify_artifact(model, runner, batches, "tiny.onnx")
    assert rep.passed, rep.format()
    assert rep.images == 5 and len(rep.outputs) == 4
    assert rep.agreement.reference == rep.agreement.matched > 0


def test_verify_artifact_catches_a_wrong_artifact(tiny_onnx, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    runner = OnnxRuntimeRunner(tiny_onnx)
    rep = verify_artifact(model, Perturbed(runner, 1e-3), [torch.randn(2, 3, 64, 64) * 50])
    assert not rep.passed
    assert rep.outputs[3].name == "odm_conf" and rep.outputs[3].max_abs == pytest.approx(1e-3, rel=1e-2)
    assert rep.outputs[0].max_abs < 1e-4


def test_image_files_errors(tmp_path):
    with pytest.raises(UserError, match="must be a directory"):
        image_files(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        image_files(tmp_path)


def test_image_batches_follow_the_preprocessing_contract(image_dir):
    from model.config import Normalization
    from model.preprocess import load_image, preprocess

    files = image_files(image_dir, max_images=3)
    batches = list(image_batches(files, 64, Normalization(), 2))
    assert [b.shape[0] for b in batches] == [2, 1]
    torch.testing.assert_close(batches[1], preprocess([load_image(files[2])], 64, Normalization()))
