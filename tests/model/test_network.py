"""RefineDet is wired from parts (``model.parts``) that are checked against each other and the config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import preset
from model.layers import MultiLevelHead
from model.network import RefineDet, build_model
from model.parts import build_parts


@pytest.fixture(scope="module")
def config():
    return preset("refinedet320_vgg16", class_names=("a", "b"), input_size=64)


def test_parts_that_agree_build_the_network(config):
    parts = build_parts(config)
    model = RefineDet(config, parts)
    assert model.arm_loc is parts.arm_loc and model.backbone is parts.backbone
    out = model(torch.zeros(1, 3, 64, 64))
    assert out.odm_conf.shape == (1, config.num_anchors, 3) and model.anchors.shape == (config.num_anchors, 4)


def test_heads_must_predict_the_generators_anchors_per_location(config):
    parts = build_parts(config)
    three = config.anchors.anchors_per_location
    assert three == 3
    wrong = MultiLevelHead([512, 512, 1024, 512], 5, 4)  # 5 anchors per location, the generator makes 3
    with pytest.raises(
        ValueError, match="arm_loc predicts 5 anchors per location; the anchor generator makes 3"
    ):
        RefineDet(config, dataclasses.replace(parts, arm_loc=wrong))
    # the other way round: the config asks for more aspect ratios than the heads were sized for
    wider = config.replace(anchors={"aspect_ratios": (2.0, 3.0)})
    with pytest.raises(ValueError, match="predicts 3 anchors per location; the anchor generator makes 5"):
        RefineDet(wider, parts)


def test_heads_levels_values_and_tcbs_are_checked(config):
    parts = build_parts(config)
    with pytest.raises(ValueError, match="odm_conf predicts 3 values per anchor; expected 4"):
        RefineDet(config.replace(class_names=("a", "b", "c")), parts)
    three_levels = MultiLevelHead([512, 512, 1024], 3, 2)
    with pytest.raises(ValueError, match="arm_conf has 3 levels; the anchor config has 4"):
        RefineDet(config, dataclasses.replace(parts, arm_conf=three_levels))
    with pytest.raises(ValueError, match="the parts lack TCBs"):
        RefineDet(config, dataclasses.replace(parts, tcbs=None))


def test_unknown_backbone_is_refused(config):
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'; choose one of vgg16, resnet101"):
        build_model(dataclasses.replace(config, backbone="vgg19"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["refinedet320_vgg16", "refinedet320_resnet101"])
def test_state_dict_keys_are_the_checkpoints(name):
    """Checkpoints store these names: the parts keep them (VGG: no adapters; ResNet: adapters + BN TCBs)."""
    keys = build_model(preset(name, input_size=64)).state_dict().keys()
    assert {k.split(".")[0] for k in keys} == (
        {"backbone", "arm_loc", "arm_conf", "tcbs", "odm_loc", "odm_conf"}
        | ({"arm_adapters", "odm_adapters"} if "resnet" in name else set())
    )
    assert ("tcbs.0.lateral.1.running_mean" in keys) == ("resnet" in name)
