import pytest
import torch
import torchvision.transforms.v2.functional as TF

import model.data.augment as augment
from model.data import EvalTransform, TrainAugmentation, collate
from model.data.photometric import adjust_hue, photometric_distort
from model.data.sampling import SAMPLERS, random_crops, sample_crop
from model.preprocess import resize_to_input


def patch_image(width=120, height=90, box=(30, 20, 70, 65)):
    """Black image with one white rectangle; returns (image uint8 [3, H, W], box pixels [1, 4])."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return image, torch.tensor([box], dtype=torch.float32)


def bright_box(image):
    """Normalised xyxy of the pixels brighter than halfway between the image's min and max."""
    gray = image.float().mean(0)
    mask = gray > (gray.min() + gray.max()) / 2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    s = image.shape[-1]
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) / s


def test_output_size_dtype_and_boxes_inside_the_image():
    g = torch.Generator().manual_seed(0)
    aug = TrainAugmentation(64)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 40.0], [60.0, 10.0, 119.0, 89.0], [5.0, 70.0, 20.0, 89.0]])
    for _ in range(60):
        image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=g)
        out, b, labels = aug(image, boxes, torch.arange(3), generator=g)
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
        assert b.shape == (labels.shape[0], 4) and b.dtype == torch.float32
        assert (b >= 0).all() and (b <= 1).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert labels.tolist() == sorted(labels.tolist())  # rows keep their order


def test_boxes_follow_the_pixels_through_expand_crop_resize_and_flip():
    """The kept box must frame the white patch wherever expand/crop/flip moved it."""
    aug = TrainAugmentation(96, mean_rgb=(0, 0, 0))
    image, box = patch_image()
    checked = 0
    for seed in range(80):
        out, b, _ = aug(image, box, torch.arange(1), generator=torch.Generator().manual_seed(seed))
        if b.shape[0] == 0 or out.float().max() - out.float().min() < 40:
            continue
        assert torch.allclose(bright_box(out), b[0], atol=2.5 / 96), seed
        checked += 1
    assert checked > 40


def test_centre_in_crop_rule(monkeypatch):
    """Fixed expand (none) and crop: exactly the boxes whose centre lies in the crop survive, clipped."""
    monkeypatch.setattr(augment, "sample_expand", lambda w, h, g=None: (w, h, 0, 0))
    monkeypatch.setattr(augment, "sample_crop", lambda boxes, g=None: (0.25, 0.0, 0.75, 1.0))
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 10.0],
            [0.0, 0.0, 60.0, 10.0],
            [45.0, 0.0, 55.0, 10.0],
            [70.0, 5.0, 100.0, 9.0],
            [75.0, 0.0, 80.0, 5.0],
        ]
    )  # centres x: 20 (out), 30 (in), 50 (in), 85 (out), 77.5 (out); crop x in [25, 75]
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        _, b, labels = TrainAugmentation(32)(
            torch.zeros(3, 20, 100, dtype=torch.uint8), boxes, torch.arange(5), generator=g
        )
        assert labels.tolist() == [1, 2]
        xs = sorted(b[:, 0::2].flatten().tolist())
        assert xs == pytest.approx(sorted([0.0, 35 / 50, 20 / 50, 30 / 50])) or xs == pytest.approx(
            sorted([1.0, 1 - 35 / 50, 1 - 20 / 50, 1 - 30 / 50])
        )


def test_no_augment_path_is_the_plain_resize():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[7.0, 5.0, 35.0, 45.0]])
    out, b, labels = EvalTransform(64)(image, boxes, torch.tensor([2]))
    expected = resize_to_input(image[None].float(), 64)[0]
    assert out.dtype == torch.uint8 and (out.float() - expected).abs().max() <= 0.5
    assert torch.equal(b, boxes / torch.tensor([70.0, 50.0, 70.0, 50.0])) and labels.tolist() == [2]


def test_same_seed_same_augmentation():
    image, box = patch_image()
    a = TrainAugmentation(64)(image, box, torch.arange(1), generator=torch.Generator().manual_seed(7))
    b = TrainAugmentation(64)(image, box, torch.arange(1), generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_crop_sampler_geometry_and_constraints():
    crops = random_crops(5000, torch.Generator().manual_seed(0))
    w, h = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    assert (crops >= 0).all() and (crops <= 1 + 1e-6).all()
    scale = (w * h).sqrt()
    assert scale.min() >= 0.3 - 1e-5 and scale.max() <= 1 + 1e-5
    assert (w / h).min() >= 0.5 - 1e-4 and (w / h).max() <= 2 + 1e-4
    assert SAMPLERS[:, 0].tolist() == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 0.0])
    assert sample_crop(torch.zeros(0, 4)) == (0.0, 0.0, 1.0, 1.0)  # no boxes: the whole image
    # a tiny box can never reach IoU 0.1 with a crop of scale >= 0.3: only samplers 0 and 6 find crops
    tiny = torch.tensor([[0.5, 0.5, 0.51, 0.51]])
    picks = {sample_crop(tiny, torch.Generator().manual_seed(s)) for s in range(30)}
    assert (0.0, 0.0, 1.0, 1.0) in picks and len(picks) > 5


def test_fast_hue_equals_torchvision():
    x = torch.rand(2, 3, 33, 41, generator=torch.Generator().manual_seed(0))
    x[0, :, :4] = 0.5  # grays (no hue) and ties between channels
    x[0, 0, 4:8], x[0, 1, 4:8] = 0.8, 0.8
    for factor in (-0.5, -0.05, 0.0, 0.03, 0.25, 0.5):
        assert torch.allclose(adjust_hue(x, factor), TF.adjust_hue(x, factor), atol=1e-5)


def test_photometric_distortion_keeps_shape_and_sometimes_changes_pixels():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outs = [photometric_distort(image, torch.Generator().manual_seed(s)) for s in range(16)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    changed = sum(not torch.equal(o, image) for o in outs)
    assert 8 <= changed < 16  # all four steps skip with probability 1/16


def test_collate_stacks_images_and_keeps_targets():
    batch = [
        (torch.zeros(3, 8, 8, dtype=torch.uint8), {"i": 0}),
        (torch.ones(3, 8, 8, dtype=torch.uint8), {"i": 1}),
    ]
    images, targets = collate(batch)
    assert (
        images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and [t["i"] for t in targets] == [0, 1]
    )
    with pytest.raises(ValueError, match="different sizes"):
        collate([batch[0], (torch.zeros(3, 9, 8, dtype=torch.uint8), {})])
