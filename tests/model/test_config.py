"""RefineDetConfig: theta (the negative anchor filter threshold) has one place, and configs written
before that (in checkpoints and manifests: once in ``loss``, once in ``postprocess``) still load."""

from __future__ import annotations

import pytest
import torch

from model.config import RefineDetConfig, preset
from model.loss import RefineDetLoss
from model.postprocess import decode_predictions


def test_round_trip_keeps_theta():
    config = preset("refinedet320_vgg16", filter_threshold=0.9)
    data = config.to_dict()
    assert data["filter_threshold"] == 0.9
    assert "filter_threshold" not in data["loss"] and "filter_threshold" not in data["postprocess"]
    assert RefineDetConfig.from_dict(data) == config


def test_a_config_with_the_old_two_thetas_loads():
    data = preset("refinedet320_vgg16").to_dict()
    del data["filter_threshold"]
    data["loss"]["filter_threshold"] = data["postprocess"]["filter_threshold"] = 0.95
    config = RefineDetConfig.from_dict(data)
    assert config.filter_threshold == 0.95 and config == preset("refinedet320_vgg16", filter_threshold=0.95)


def test_two_different_old_thetas_are_refused():
    data = preset("refinedet320_vgg16").to_dict()
    data["loss"]["filter_threshold"], data["postprocess"]["filter_threshold"] = 0.99, 0.9
    with pytest.raises(ValueError, match="conflicting negative anchor filter thresholds"):
        RefineDetConfig.from_dict(data)


def test_loss_and_inference_read_the_same_theta():
    """An anchor with ARM background probability 0.97 is filtered at theta 0.95 and kept at 0.99, in the
    ODM loss (not eligible as a negative) and at inference (scores zeroed) alike."""
    bg = torch.tensor(0.97)
    arm_conf = torch.stack([torch.log(bg), torch.log(1 - bg)])[None, None]  # [1, 1, 2] logits
    for theta, filtered in ((0.95, True), (0.99, False)):
        config = preset("refinedet320_vgg16", class_names=("a",), filter_threshold=theta)
        _, eligible = RefineDetLoss(config).negative_filter(arm_conf)
        assert eligible is not None and bool(eligible[0, 0]) is not filtered
        zeros = torch.zeros(1, 1, 4)
        _, scores = decode_predictions(zeros, arm_conf, zeros, torch.zeros(1, 1, 2), torch.rand(1, 4), config)
        assert (float(scores.sum()) == 0.0) is filtered
