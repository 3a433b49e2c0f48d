import numpy as np
import torch
from PIL import Image

from model.config import Normalization
from model.preprocess import normalize, pil_to_rgb, preprocess


def test_16bit_grayscale_becomes_8bit_rgb_scaled_to_its_maximum():
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I")
    out = pil_to_rgb(im)
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 2)
    assert out[0].tolist() == [[0, 63], [127, 255]]
    assert torch.equal(out[0], out[2])


def test_alpha_is_flattened_on_white_and_exif_rotation_applied():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    assert pil_to_rgb(rgba)[:, 0, 0].tolist() == [255, 255, 255]
    im = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.info["exif"] = exif.tobytes()
    im2 = Image.open(__import__("io").BytesIO(_jpeg(im, exif)))
    assert pil_to_rgb(im2).shape[1:] == (4, 2)


def _jpeg(im: Image.Image, exif) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_bgr_caffe_normalisation_flips_channels_and_subtracts_mean():
    x = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    y = normalize(x, Normalization())
    assert y.flatten().tolist() == [30 - 104, 20 - 117, 10 - 123]


def test_preprocess_warps_any_size_to_the_square_input():
    images = [
        torch.randint(0, 255, (3, 48, 80), dtype=torch.uint8),
        torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
    ]
    out = preprocess(images, 64, Normalization.torchvision())
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32


def test_channels_last_pixels_give_the_same_network_input_contiguous():
    """``pil_to_rgb(contiguous=False)`` is a view over PIL's [H, W, 3] pixels; ``preprocess`` resizes it
    channels-last (the CPU's fast path) to bitwise the same input as from contiguous pixels."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8), "RGB")
    view, copy = pil_to_rgb(image, contiguous=False), pil_to_rgb(image)
    assert torch.equal(view, copy) and copy.is_contiguous() and not view.is_contiguous()
    norm = Normalization(channel_order="BGR", mean=(104.0, 117.0, 123.0))
    for size in (64, 320):
        fast, plain = preprocess(view.unsqueeze(0), size, norm), preprocess(copy[None], size, norm)
        assert fast.is_contiguous() and fast.shape == (1, 3, size, size)
        assert torch.equal(fast, plain)
