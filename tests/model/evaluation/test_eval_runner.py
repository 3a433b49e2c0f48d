"""predict_dataset is the shared preprocess -> network -> PostProcessor -> to_pixels path."""

from __future__ import annotations

import math

import pytest
import torch

from model.errors import UserError
from model.evaluation.runner import evaluate_voc, predict_dataset
from model.postprocess import PostProcessor, to_pixels
from model.preprocess import preprocess


def reference_predictions(model, dataset):
    """The same pipeline written out by hand, one image at a time."""
    config = model.config
    out = []
    with torch.no_grad():
        for i in range(len(dataset)):
            image = dataset.load_image(i)
            dets = PostProcessor(config)(
                tuple(model(preprocess([image], config.input_size, config.normalization))), model.anchors
            )
            boxes, scores, labels = dets.image(0)
            out.append(
                {
                    "boxes": to_pixels(boxes, image.shape[-1], image.shape[-2]),
                    "scores": scores,
                    "labels": labels,
                }
            )
    return out


def test_predictions_equal_the_shared_pipeline_and_do_not_depend_on_batch_size(tiny_model, fake_dataset):
    expected = reference_predictions(tiny_model, fake_dataset)
    for batch_size in (1, 3):
        got = predict_dataset(tiny_model, fake_dataset, batch_size=batch_size, progress=False)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert len(g["scores"]) > 0
            torch.testing.assert_close(g["scores"], e["scores"], atol=1e-5, rtol=0)
            torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
            assert torch.equal(g["labels"], e["labels"])


def test_model_mode_is_restored(tiny_model, fake_dataset):
    tiny_model.train()
    try:
        predict_dataset(tiny_model, fake_dataset, progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_postprocess_override_is_used(tiny_model, fake_dataset):
    from model.config import PostprocessConfig

    got = predict_dataset(
        tiny_model, fake_dataset, postprocess=PostprocessConfig(keep_top_k=5), progress=False
    )
    assert all(len(d["scores"]) <= 5 for d in got)


def test_evaluate_voc_returns_map_and_per_class(tiny_model, fake_dataset):
    result = evaluate_voc(tiny_model, fake_dataset, device="cpu", batch_size=2, progress=False)
    assert set(result["per_class"]) == {"a", "b"}
    assert result["num_images"] == 3 and result["metric"] == "voc07"
    assert 0.0 <= result["mAP"] <= 1.0 and not math.isnan(result["mAP"])
    assert result["num_positives"] == {"a": 3, "b": 2}  # the difficult "b" box of image 1 is not counted
    voc12 = evaluate_voc(tiny_model, fake_dataset, use_07_metric=False, progress=False)
    assert voc12["metric"] == "voc12"


def test_class_mismatch_is_a_user_error(tiny_model, fake_dataset):
    fake_dataset.class_names = ("a", "c")
    with pytest.raises(UserError, match="classes"):
        evaluate_voc(tiny_model, fake_dataset, progress=False)


def test_bad_batch_size(tiny_model, fake_dataset):
    with pytest.raises(ValueError, match="batch_size"):
        predict_dataset(tiny_model, fake_dataset, batch_size=0)


@pytest.mark.gpu
def test_cuda_predictions_match_cpu(tiny_model, make_dataset, monkeypatch):
    from model.evaluation.multiscale import ScaleRule

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    dataset = make_dataset(n=2)
    for scales in (None, [ScaleRule(64), ScaleRule(128, max_shorter=40)]):
        cpu = predict_dataset(tiny_model, dataset, device="cpu", scales=scales, progress=False)
        gpu = predict_dataset(tiny_model, dataset, device="cuda", scales=scales, progress=False)
        tiny_model.to("cpu")
        for c, g in zip(cpu, gpu, strict=True):
            assert g["boxes"].device.type == "cpu"
            n = min(len(c["scores"]), len(g["scores"]), 20)  # near-ties may swap order beyond the top
            torch.testing.assert_close(g["scores"][:n], c["scores"][:n], atol=1e-3, rtol=0)
            torch.testing.assert_close(g["boxes"][:n], c["boxes"][:n], atol=0.5, rtol=0)
