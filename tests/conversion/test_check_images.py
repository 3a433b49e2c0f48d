"""The synthetic smears the CPU engine is checked on at first start: deterministic, photo-sized, and
close enough to BCCD that the shipped model finds red cells in them (so the check compares detections,
not an empty set)."""

from __future__ import annotations

import pytest
import torch

from conversion.check_images import HEIGHT, WIDTH, synthetic_smears


def test_the_smears_are_deterministic_photo_sized_rgb():
    a, b = synthetic_smears(3, seed=5), synthetic_smears(3, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.shape == (3, HEIGHT, WIDTH) and x.dtype == torch.uint8 for x in a)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], synthetic_smears(1, seed=6)[0])
    assert 100 < float(a[0].float().mean()) < 230  # a pale field with darker cells, not noise or black


@pytest.mark.slow
def test_the_shipped_model_finds_red_cells_in_them():
    from model.checkpoint import load_model
    from model.postprocess import PostProcessor
    from model.preprocess import preprocess
    from model.zoo import default_checkpoint

    checkpoint = default_checkpoint()
    if checkpoint is None:
        pytest.skip("no shipped checkpoint")
    model, _ = load_model(checkpoint, map_location="cpu")
    model.eval()
    cfg = model.config
    with torch.inference_mode():
        found = PostProcessor(cfg)(
            model(preprocess(synthetic_smears(4), cfg.input_size, cfg.normalization)), model.anchors
        )
    rbc = cfg.class_names.index("RBC") + 1
    for i in range(4):
        _, _, labels = found.image(i, 0.5)
        assert int((labels == rbc).sum()) >= 5  # 18-24 measured
