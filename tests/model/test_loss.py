"""RefineDet loss: hard negative mining, normalisation, negative anchor filtering, the ARM/ODM
gradient split, autocast, and a tiny overfit run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.anchors import generate_anchors
from model.box_coding import BoxCoder
from model.config import RefineDetConfig, preset
from model.loss import RefineDetLoss, hard_negative_mask
from model.matching import match_batch
from model.network import RefineDetOutput, build_model

NUM_CLASSES = 3  # background + "a", "b"


@pytest.fixture(scope="module")
def config() -> RefineDetConfig:
    return preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))


@pytest.fixture(scope="module")
def anchors(config: RefineDetConfig) -> torch.Tensor:
    return generate_anchors(config)  # [255, 4]


def make_outputs(num_images: int, num_anchors: int, seed: int | None = None) -> RefineDetOutput:
    """Leaf tensors with requires_grad; zeros (p = uniform, no refinement) unless a seed is given."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    tensors = []
    for width in (4, 2, 4, NUM_CLASSES):
        shape = (num_images, num_anchors, width)
        tensors.append(torch.randn(shape, generator=g) if g else torch.zeros(shape))
    return RefineDetOutput(*(t.requires_grad_() for t in tensors))


def two_image_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[0.1, 0.1, 0.6, 0.7]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.5, 0.2, 0.9, 0.5], [0.0, 0.5, 0.3, 1.0]]), "labels": torch.tensor([2, 1])},
    ]


def empty_target() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def selected_rows(grad: torch.Tensor) -> torch.Tensor:
    """Anchors [B, A] that took part in a loss term: their output rows received gradient."""
    return grad.abs().sum(dim=-1) > 0


# ---------------------------------------------------------------- hard negative mining


def test_mining_keeps_exactly_ratio_times_positives_with_the_highest_loss() -> None:
    g = torch.Generator().manual_seed(0)
    bg_loss = torch.rand(3, 50, generator=g)
    positives = torch.zeros(3, 50, dtype=torch.bool)
    positives[0, [3, 7]] = True  # P = 2
    positives[1, :5] = True  # P = 5
    for ratio in (3, 2):
        negatives = hard_negative_mask(bg_loss, positives, ratio)
        assert negatives.sum(dim=1).tolist() == [2 * ratio, 5 * ratio, 0]  # image 2 has no positives
        assert not (negatives & positives).any()
        for b in range(2):
            loss = bg_loss[b].masked_fill(positives[b], -1.0)
            top = set(loss.topk(int(negatives[b].sum())).indices.tolist())
            assert set(negatives[b].nonzero().flatten().tolist()) == top


def test_mining_is_capped_by_available_negatives_and_respects_eligibility() -> None:
    bg_loss = torch.arange(10, dtype=torch.float32).expand(2, 10)  # anchor 9 hardest
    positives = torch.zeros(2, 10, dtype=torch.bool)
    positives[0, :6] = True  # 18 wanted, 4 available
    positives[1, 0] = True  # 3 wanted
    eligible = torch.ones(2, 10, dtype=torch.bool)
    eligible[1, 9] = False
    negatives = hard_negative_mask(bg_loss, positives, 3, eligible)
    assert negatives[0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert negatives[1].nonzero().flatten().tolist() == [6, 7, 8]  # 9 is ineligible: next three


# ---------------------------------------------------------------- loss values and normalisation


def test_uniform_logits_give_ratio_plus_one_times_log_k(
    config: RefineDetConfig, anchors: torch.Tensor
) -> None:
    targets = two_image_targets()
    out = make_outputs(2, anchors.shape[0])
    losses = RefineDetLoss(config)(out, anchors, targets)
    # uniform logits: every selected anchor costs log K; (P + 3P) / P anchors per positive
    torch.testing.assert_close(losses["arm_conf"], torch.tensor(4 * math.log(2)))
    torch.testing.assert_close(losses["odm_conf"], torch.tensor(4 * math.log(NUM_CLASSES)))
    # zero deltas: the loc loss is the smooth L1 of the encoded targets over the positives
    loc_t, labels = match_batch(targets, anchors, BoxCoder(config.anchors.variances))
    pos = labels > 0
    expected = (
        torch.nn.functional.smooth_l1_loss(torch.zeros_like(loc_t[pos]), loc_t[pos], reduction="sum")
        / pos.sum()
    )
    torch.testing.assert_close(losses["arm_loc"], expected)
    torch.testing.assert_close(losses["odm_loc"], expected)  # zero arm_loc: refined == tiled
    assert losses["arm_num_pos"].item() == pos.sum().item() >= 3  # every gt got at least one anchor
    total = losses["arm_loc"] + losses["arm_conf"] + losses["odm_loc"] + losses["odm_conf"]
    torch.testing.assert_close(losses["loss"], total)


def test_each_module_is_normalised_by_its_own_positives(
    config: RefineDetConfig, anchors: torch.Tensor
) -> None:
    out = make_outputs(2, anchors.shape[0])
    with torch.no_grad():
        out.arm_loc.copy_(torch.randn(out.arm_loc.shape, generator=torch.Generator().manual_seed(6)))
    losses = RefineDetLoss(config)(out, anchors, two_image_targets())
    assert losses["arm_num_pos"].item() != losses["odm_num_pos"].item()  # refined anchors match differently
    torch.testing.assert_close(losses["arm_conf"], torch.tensor(4 * math.log(2)))
    torch.testing.assert_close(losses["odm_conf"], torch.tensor(4 * math.log(NUM_CLASSES)))


def test_no_objects_gives_exactly_zero_and_finite_gradients(
    config: RefineDetConfig, anchors: torch.Tensor
) -> None:
    out = make_outputs(2, anchors.shape[0], seed=0)
    losses = RefineDetLoss(config)(out, anchors, [empty_target(), empty_target()])
    for key in ("loss", "arm_loc", "arm_conf", "odm_loc", "odm_conf"):
        assert losses[key].item() == 0.0, key
    losses["loss"].backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.eq(0).all() for t in out)


def test_an_empty_image_in_a_batch_takes_no_part(config: RefineDetConfig, anchors: torch.Tensor) -> None:
    out = make_outputs(2, anchors.shape[0], seed=1)
    losses = RefineDetLoss(config)(out, anchors, [two_image_targets()[0], empty_target()])
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    losses["loss"].backward()
    assert selected_rows(out.odm_conf.grad)[0].any()
    assert not selected_rows(out.odm_conf.grad)[1].any() and not selected_rows(out.arm_conf.grad)[1].any()


# ---------------------------------------------------------------- gradient split and cascade


def test_odm_loss_does_not_backprop_into_the_arm(config: RefineDetConfig, anchors: torch.Tensor) -> None:
    out = make_outputs(2, anchors.shape[0], seed=2)
    losses = RefineDetLoss(config)(out, anchors, two_image_targets())
    (losses["odm_loc"] + losses["odm_conf"]).backward()
    assert out.arm_loc.grad is None and out.arm_conf.grad is None
    assert out.odm_loc.grad.abs().sum() > 0 and out.odm_conf.grad.abs().sum() > 0


def test_arm_loss_does_not_touch_the_odm(config: RefineDetConfig, anchors: torch.Tensor) -> None:
    out = make_outputs(2, anchors.shape[0], seed=3)
    losses = RefineDetLoss(config)(out, anchors, two_image_targets())
    (losses["arm_loc"] + losses["arm_conf"]).backward()
    assert out.odm_loc.grad is None and out.odm_conf.grad is None
    assert out.arm_loc.grad.abs().sum() > 0


@pytest.mark.parametrize("cascade", [True, False])
def test_odm_matches_refined_anchors_only_with_cascade(
    config: RefineDetConfig, anchors: torch.Tensor, cascade: bool
) -> None:
    cfg = config.replace(ablation={"cascade": cascade, "negative_filtering": False})
    loss = RefineDetLoss(cfg)
    base = make_outputs(2, anchors.shape[0], seed=4)
    shifted = base._replace(arm_loc=base.arm_loc.detach() * 5)  # very different refined anchors
    a, b = loss(base, anchors, two_image_targets()), loss(shifted, anchors, two_image_targets())
    assert torch.equal(a["odm_loc"], b["odm_loc"]) is not cascade
    assert torch.equal(a["arm_conf"], b["arm_conf"])
    if not cascade:
        assert a["odm_num_pos"].item() == a["arm_num_pos"].item()


# ---------------------------------------------------------------- negative anchor filtering


def easy_anchor_setup(anchors: torch.Tensor) -> tuple[RefineDetOutput, torch.Tensor]:
    """Outputs where anchors 100..199 are ARM-easy (p_bg ~ 1 - 4.5e-5) and have the highest ODM
    background loss, so unfiltered mining would pick them first. Returns (outputs, easy [1, A])."""
    out = make_outputs(1, anchors.shape[0])
    easy = torch.zeros(1, anchors.shape[0], dtype=torch.bool)
    easy[0, 100:200] = True
    with torch.no_grad():
        out.arm_conf[..., 0][easy] = 10.0
        out.odm_conf[..., 1][easy] = 8.0
    return out, easy


def test_easy_anchors_are_never_odm_negatives(config: RefineDetConfig, anchors: torch.Tensor) -> None:
    targets = [{"boxes": torch.tensor([[0.7, 0.7, 0.95, 0.95]]), "labels": torch.tensor([2])}]
    _, labels = match_batch(targets, anchors, BoxCoder(config.anchors.variances))
    out, easy = easy_anchor_setup(anchors)
    easy_negatives = easy & (labels == 0)
    assert easy_negatives.sum() > 3 * (labels > 0).sum()  # enough to fill the whole negative quota
    RefineDetLoss(config)(out, anchors, targets)["odm_conf"].backward()
    chosen = selected_rows(out.odm_conf.grad)
    assert chosen.sum() == 4 * (labels > 0).sum()  # positives + 3x negatives, found elsewhere
    assert not (chosen & easy_negatives).any()

    out, easy = easy_anchor_setup(anchors)
    unfiltered = config.replace(ablation={"negative_filtering": False})
    RefineDetLoss(unfiltered)(out, anchors, targets)["odm_conf"].backward()
    chosen = selected_rows(out.odm_conf.grad)
    assert (chosen & (labels == 0)).sum() == (chosen & easy_negatives).sum() > 0  # they win mining


@pytest.mark.parametrize(("mode", "kept"), [("code", True), ("paper", False)])
def test_easy_positives_code_keeps_paper_drops(
    config: RefineDetConfig, anchors: torch.Tensor, mode: str, kept: bool
) -> None:
    cfg = config.replace(loss={"negative_filter": mode})
    targets = [two_image_targets()[0]]
    _, labels = match_batch(targets, anchors, BoxCoder(cfg.anchors.variances))
    positives = labels > 0
    out = make_outputs(1, anchors.shape[0])
    first = positives[0].nonzero()[0, 0]
    with torch.no_grad():
        out.arm_conf[0, first, 0] = 10.0  # one positive anchor is ARM-easy
    losses = RefineDetLoss(cfg)(out, anchors, targets)
    (losses["odm_loc"] + losses["odm_conf"]).backward()
    assert selected_rows(out.odm_conf.grad)[0, first].item() is kept
    assert selected_rows(out.odm_loc.grad)[0, first].item() is kept
    assert losses["odm_num_pos"].item() == positives.sum().item() - (0 if kept else 1)
    assert losses["arm_num_pos"].item() == positives.sum().item()  # the ARM is never filtered


# ---------------------------------------------------------------- precision and robustness


def test_losses_are_float32_under_autocast(config: RefineDetConfig, anchors: torch.Tensor) -> None:
    out = make_outputs(2, anchors.shape[0], seed=5)
    half = RefineDetOutput(*(t.detach().bfloat16() for t in out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = RefineDetLoss(config)(half, anchors, two_image_targets())
    ref = RefineDetLoss(config)(RefineDetOutput(*(t.float() for t in half)), anchors, two_image_targets())
    for key in ("loss", "arm_loc", "arm_conf", "odm_loc", "odm_conf"):
        assert low[key].dtype == torch.float32, key
        torch.testing.assert_close(low[key], ref[key])


def test_batch_size_mismatch_is_an_error(config: RefineDetConfig, anchors: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="targets"):
        RefineDetLoss(config)(make_outputs(2, anchors.shape[0]), anchors, [empty_target()])


# ---------------------------------------------------------------- end to end


class CachedSources(nn.Module):
    """Stands in for the backbone: returns its four source maps computed once for a fixed batch."""

    def __init__(self, sources: list[torch.Tensor]) -> None:
        super().__init__()
        self.sources = [s.detach() for s in sources]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.sources


def test_tiny_model_overfits_a_fixed_batch(config: RefineDetConfig) -> None:
    """Heads, TCBs, matching and loss together learn a fixed batch. The (frozen) VGG body runs once
    and its maps are cached: a full VGG step costs ~0.3 s on 2 CPU cores. The TCBs are 32 channels wide
    instead of 256: the same wiring with 0.3 M trainable parameters instead of 12 M, whose Adam updates
    took most of the time (minutes on a loaded 2-core machine)."""
    torch.manual_seed(0)
    model = build_model(config.replace(tcb_channels=32))
    images = torch.randn(2, 3, 64, 64) * 50
    with torch.no_grad():
        model.backbone = CachedSources(model.backbone(images))
    criterion = RefineDetLoss(config)
    targets = two_image_targets()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        losses = criterion(model(images), model.anchors, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0], history
    assert losses["odm_num_pos"].item() >= 3  # the ODM still matched every gt on its refined anchors
