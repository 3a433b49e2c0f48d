import pytest
import torch
from torchvision.ops import nms

from model.anchors import generate_anchors
from model.box_coding import BoxCoder, xyxy_to_cxcywh
from model.config import PostprocessConfig, preset
from model.postprocess import (
    Detections,
    PostProcessor,
    adaptive_nms,
    batched_greedy_nms,
    box_iou,
    decode_predictions,
    detections_to_host,
    nms_buckets,
    select_detections,
    to_pixels,
)


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.02
    return torch.cat([xy, xy + wh], dim=1)


def test_batched_nms_equals_torchvision_greedy_nms():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        boxes = random_boxes(60, g)
        scores = torch.rand(60, generator=g)
        order = scores.argsort(descending=True)
        keep = batched_greedy_nms(boxes[order][None], torch.ones(1, 60, dtype=torch.bool), 0.45)[0]
        ours = set(order[keep].tolist())
        assert ours == set(nms(boxes, scores, 0.45).tolist())


def test_nms_never_keeps_overlapping_same_class_boxes():
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.51, 0.5], [0.6, 0.6, 0.9, 0.9]])
    scores = torch.zeros(1, 3, 2)
    scores[0, :, 0] = torch.tensor([0.9, 0.8, 0.7])  # class 1: first two overlap (IoU ~0.95)
    scores[0, :, 1] = torch.tensor([0.0, 0.85, 0.0])  # class 2: the second box alone survives
    dets = select_detections(boxes[None], scores, PostprocessConfig())
    _, s, lab = dets.image(0)
    assert sorted(zip(lab.tolist(), [round(x, 2) for x in s.tolist()], strict=True)) == [
        (1, 0.7),
        (1, 0.9),
        (2, 0.85),
    ]


def test_score_threshold_top_k_and_keep_top_k():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(500, g)[None]
    scores = torch.rand(1, 500, 3, generator=g) * 0.02  # about half under 0.01
    dets = select_detections(boxes, scores, PostprocessConfig(nms_threshold=1.0, top_k=50, keep_top_k=120))
    _, s, lab = dets.image(0)
    assert (s > 0.01).all()
    assert len(s) == 120  # 3 classes x top_k 50 = 150 candidates, cut to keep_top_k
    assert torch.all(s[:-1] >= s[1:])
    assert max((lab == c).sum().item() for c in (1, 2, 3)) <= 50
    assert dets.scores.shape == (1, 120)


def test_output_is_padded_to_keep_top_k():
    dets = select_detections(torch.zeros(2, 10, 4), torch.zeros(2, 10, 3), PostprocessConfig(keep_top_k=7))
    assert dets.boxes_xyxy.shape == (2, 7, 4) and not dets.valid.any()


def test_decode_inverts_two_step_encoding_and_filters_easy_negatives():
    config = preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))
    anchors = generate_anchors(config)
    coder = BoxCoder(config.anchors.variances)
    a = anchors.shape[0]
    refined = anchors.clone()
    refined[:, 2:] *= 1.3
    target_xyxy = torch.tensor([0.2, 0.3, 0.6, 0.7]).expand(a, 4)
    arm_loc = coder.encode(refined, anchors)[None]
    odm_loc = coder.encode(xyxy_to_cxcywh(target_xyxy), refined)[None]
    arm_conf = torch.zeros(1, a, 2)
    arm_conf[0, :5, 0] = 10.0  # background prob > 0.99 on the first five anchors
    odm_conf = torch.zeros(1, a, 3)
    odm_conf[0, :, 1] = 5.0
    boxes, scores = decode_predictions(arm_loc, arm_conf, odm_loc, odm_conf, anchors, config)
    assert torch.allclose(boxes[0], target_xyxy, atol=1e-5)
    assert (scores[0, :5] == 0).all() and (scores[0, 5:, 0] > 0.9).all()


def test_postprocessor_on_network_outputs_runs_end_to_end():
    from model.network import build_model

    config = preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))
    model = build_model(config).eval()
    with torch.no_grad():
        dets = PostProcessor(config)(model(torch.randn(2, 3, 64, 64)), model.anchors)
    assert isinstance(dets, Detections)
    assert dets.boxes_xyxy.shape == (2, config.postprocess.keep_top_k, 4)
    assert ((dets.labels >= 0) & (dets.labels <= 2)).all()


def test_to_pixels_scales_and_clips():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 1.2]])
    px = to_pixels(boxes, width=640, height=480)
    assert torch.allclose(px, torch.tensor([[64.0, 96.0, 320.0, 480.0]]))


def clustered_predictions(b: int, a: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes jittered around a few centres (long suppression chains), scores with many candidates."""
    g = torch.Generator().manual_seed(seed)
    centres = random_boxes(8, g)
    boxes = centres[torch.randint(0, 8, (b, a), generator=g)] + torch.randn(b, a, 4, generator=g) * 0.03
    return boxes, torch.rand(b, a, c, generator=g) * 0.5


def same_detections(x: Detections, y: Detections) -> None:
    torch.testing.assert_close(x.scores, y.scores)
    torch.testing.assert_close(x.labels, y.labels)
    torch.testing.assert_close(x.boxes_xyxy, y.boxes_xyxy)


def test_sync_free_selection_equals_adaptive_when_converged():
    config = PostprocessConfig(top_k=60, keep_top_k=50)
    for seed in range(5):
        boxes, scores = clustered_predictions(3, 200, 4, seed)
        exact = select_detections(boxes, scores, config)
        fast = select_detections(boxes, scores, config, nms_passes=60)
        assert exact.converged is None and bool(fast.converged)
        same_detections(fast, exact)


def chain_boxes(n: int) -> torch.Tensor:
    """Boxes shifted step by step: each overlaps its neighbours only, so greedy NMS needs ~n passes."""
    x = torch.arange(n, dtype=torch.float32) * 0.02
    return torch.stack([x, torch.zeros(n), x + 0.05, torch.full((n,), 0.05)], dim=1)


def test_sync_free_flags_unconverged_nms_and_host_copy_redoes_it_exactly():
    boxes = chain_boxes(12)[None]
    scores = torch.linspace(0.9, 0.5, 12)[None, :, None]  # sorted along the chain
    config = PostprocessConfig(nms_threshold=0.3, keep_top_k=12)
    exact = select_detections(boxes, scores, config)
    assert exact.scores.gt(0).sum() == 6  # every other box of the chain survives
    short = select_detections(boxes, scores, config, nms_passes=2)
    assert not bool(short.converged)
    assert not torch.equal(short.scores, exact.scores)  # two passes are not enough here...
    host = detections_to_host(short, boxes, scores, config)  # ...so the host copy recomputes it
    same_detections(host, exact)
    assert host.converged is None


def test_sync_free_selection_never_reads_tensor_values_on_the_host():
    """Under FakeTensorMode any read of a tensor's data (``int(t)``, ``torch.equal``, ``nonzero``) raises:
    the sync-free mode must trace through, so it can run inside a CUDA graph. The adaptive mode must not
    (which shows the check can fail)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = PostprocessConfig(top_k=50, keep_top_k=40)
    with FakeTensorMode() as mode:
        boxes = mode.from_tensor(torch.rand(2, 100, 4))
        scores = mode.from_tensor(torch.rand(2, 100, 3))
        det = select_detections(boxes, scores, config, nms_passes=4)
        assert det.boxes_xyxy.shape == (2, 40, 4) and det.converged is not None
        with pytest.raises(Exception, match=r"local_scalar_dense|data.dependent"):
            select_detections(boxes, scores, config)


def test_post_processor_host_path_is_exact_in_both_modes():
    cfg = preset("refinedet320_vgg16", class_names=("a", "b"))
    anchors = generate_anchors(cfg)
    g = torch.Generator().manual_seed(3)
    a = anchors.shape[0]
    outputs = (
        torch.randn(2, a, 4, generator=g) * 0.5,
        torch.randn(2, a, 2, generator=g),
        torch.randn(2, a, 4, generator=g) * 0.5,
        torch.randn(2, a, 3, generator=g) * 2,
    )
    adaptive = PostProcessor(cfg, nms_passes=None).to_host(outputs, anchors)
    for passes in (1, 3, 50):
        same_detections(PostProcessor(cfg, nms_passes=passes).to_host(outputs, anchors), adaptive)
    same_detections(PostProcessor(cfg)(outputs, anchors), adaptive)


@pytest.mark.gpu
def test_sync_free_selection_does_not_synchronise_on_cuda():
    """On the GPU itself: with CUDA's sync debug mode set to error, the sync-free mode runs and the
    adaptive mode (which reads counts on the host) raises."""
    boxes, scores = clustered_predictions(4, 300, 3, seed=7)
    boxes, scores = boxes.cuda(), scores.cuda()
    config = PostprocessConfig(top_k=100, keep_top_k=50)
    exact = select_detections(boxes, scores, config)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast = select_detections(boxes, scores, config, nms_passes=30)
        with pytest.raises(RuntimeError, match="synchroniz"):
            select_detections(boxes, scores, config)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(fast.converged)
    same_detections(fast.to("cpu"), exact.to("cpu"))


def test_per_image_equals_image_for_every_image():
    boxes, scores = clustered_predictions(4, 150, 3, seed=11)
    scores[2] = 0  # an image without detections
    dets = select_detections(boxes, scores, PostprocessConfig(top_k=40, keep_top_k=30))
    per_image = dets.per_image()
    assert len(per_image) == 4 and len(per_image[2][1]) == 0
    for i, views in enumerate(per_image):
        for got, want in zip(views, dets.image(i), strict=True):
            assert torch.equal(got, want)


def test_post_processor_finishes_any_stage_with_the_same_detections():
    """Raw heads, decoded boxes/scores and sync-free selected detections (converged or not) go through
    the one entry, on the device and to the host, to the same exact detections."""
    from model.network import RefineDetOutput
    from model.postprocess import DecodedOutput, SelectedOutput

    small = PostprocessConfig(top_k=100, keep_top_k=50)  # fast, and still more than one NMS pass
    cfg = preset("refinedet320_vgg16", class_names=("a", "b"), input_size=128).replace(postprocess=small)
    anchors = generate_anchors(cfg)
    g = torch.Generator().manual_seed(5)
    a = anchors.shape[0]
    raw = RefineDetOutput(
        torch.randn(2, a, 4, generator=g) * 0.5,
        torch.randn(2, a, 2, generator=g),
        torch.randn(2, a, 4, generator=g) * 0.5,
        torch.randn(2, a, 3, generator=g) * 2,
    )
    pp = PostProcessor(cfg)
    decoded = DecodedOutput(*decode_predictions(*raw, anchors, cfg))
    exact = select_detections(*decoded, cfg.postprocess)
    unconverged = select_detections(*decoded, cfg.postprocess, nms_passes=1)
    assert not bool(unconverged.converged)  # one pass is not enough for these random boxes
    converged = select_detections(*decoded, cfg.postprocess, nms_passes=50)
    stages = {
        "raw": raw,
        "decoded": decoded,
        "selected": SelectedOutput(converged, *decoded),
        "selected, not converged": SelectedOutput(unconverged, *decoded),
    }
    for name, outputs in stages.items():
        anchors_or_none = anchors if name == "raw" else None  # only raw heads need the anchors
        same_detections(pp(outputs, anchors_or_none), exact)
        same_detections(pp.to_host(outputs, anchors_or_none), exact)
        torch.testing.assert_close(tuple(pp.decode(outputs, anchors_or_none)), tuple(decoded))
    # verify compares an artifact's tensors with the reference brought to the same stage
    torch.testing.assert_close(tuple(pp.to_stage_of(raw, decoded, anchors)), tuple(decoded))
    assert pp.to_stage_of(raw, raw, anchors) is raw
    with pytest.raises(ValueError, match="anchors"):
        pp(raw)


def test_box_iou_equals_torchvision_and_broadcasts():
    """The project's IoU (used by verify in the CPU image, which has no torchvision) is torchvision's."""
    from torchvision.ops import box_iou as tv_box_iou

    from model.postprocess import box_iou

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 4, generator=g) * 100, torch.rand(5, 4, generator=g) * 100
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    b[0] = a[0]  # an exact match
    assert torch.allclose(box_iou(a, b), tv_box_iou(a, b), atol=1e-6)
    assert box_iou(a, b)[0, 0] == pytest.approx(1.0)
    batched = box_iou(torch.stack([a, a]), torch.stack([a, a]))
    assert batched.shape == (2, 7, 7) and torch.allclose(batched[1], tv_box_iou(a, a), atol=1e-6)


def reference_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The IoU as first written (corner pairs broadcast together): ``box_iou`` must equal it bit for bit."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1e-12)


def test_box_iou_is_bitwise_the_reference_formula():
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(90, g).view(3, 30, 4)
    boxes[0, 3] = torch.tensor([0.5, 0.5, 0.4, 0.6])  # inverted: zero area
    assert torch.equal(box_iou(boxes, boxes), reference_iou(boxes, boxes))
    assert torch.equal(box_iou(boxes[0], boxes[1, :7]), reference_iou(boxes[0], boxes[1, :7]))
    assert box_iou(boxes[0], boxes[1, :7]).shape == (30, 7)


def test_nms_buckets_group_similar_lengths_and_skip_empty_groups():
    assert nms_buckets([8, 400, 0, 85, 300, 90]) == [([1, 4], 400), ([5, 3], 90), ([0], 8)]
    assert nms_buckets([0, 0]) == []
    assert nms_buckets([10, 10, 10], budget=200) == [([0, 1], 10), ([2], 10)]  # 3 x 10 x 10 > 200


def test_adaptive_nms_equals_batched_nms_on_groups_of_any_length():
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(6 * 50, g).view(6, 50, 4)
    lengths = torch.tensor([50, 3, 0, 27, 49, 1])
    valid = torch.arange(50)[None] < lengths[:, None]
    valid[3, 5] = False  # a hole inside a prefix (NaN scores sort first): still exact
    assert torch.equal(adaptive_nms(boxes, valid, 0.3), batched_greedy_nms(boxes, valid, 0.3))
    assert not adaptive_nms(boxes, valid, 0.3)[2].any()
