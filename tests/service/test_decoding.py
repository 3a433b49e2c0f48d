"""The engine's batched JPEG decoder: the same pixels as PIL (on the CPU both are libjpeg-turbo with the
same IDCT, so exactly; on CUDA nvJPEG within a small tolerance), EXIF orientation as PIL applies it,
a per-image fallback to PIL when the decoder refuses one image, and a 400 for a truly corrupt one
without failing the rest of the batch."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from service_testing import corrupt_huffman_table, encode, noise_image

from model.preprocess import pil_to_rgb
from service.benchmark import synthetic_jpeg
from service.decoding import JpegDecoder
from service.imaging import EncodedImage, ImageProblem, UnusableImage, read_header

LIMITS = (40_000_000, 8)


def smooth_image(width: int, height: int) -> Image.Image:
    """Gradients: JPEG-friendly content (noise exaggerates IDCT differences between decoders)."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(rgb, "RGB")


def exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif)


def as_upload(data: bytes) -> EncodedImage:
    header = read_header(data, *LIMITS)
    assert header.plain_jpeg
    return header.deferred(data)


def pil_pixels(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return pil_to_rgb(im)


UPLOADS = {
    "rgb": encode(noise_image(96, 72, seed=1)),
    "gray": encode(noise_image(64, 48, seed=2).convert("L")),
    "progressive": encode(noise_image(72, 40, seed=3), "JPEG", progressive=True),
    "rotated": exif_jpeg(noise_image(80, 64, seed=4), 6),
    "subsampled 4:2:0": encode(smooth_image(100, 60), "JPEG", subsampling=2),
}


def test_cpu_decode_equals_pil_exactly():
    decoder = JpegDecoder(torch.device("cpu"))
    results = decoder([as_upload(d) for d in UPLOADS.values()])
    for (name, data), pixels in zip(UPLOADS.items(), results, strict=True):
        assert isinstance(pixels, torch.Tensor), name
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, pil_pixels(data)), name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil_exif_transpose(orientation):
    data = exif_jpeg(noise_image(40, 24, seed=orientation), orientation)
    [pixels] = JpegDecoder(torch.device("cpu"))([as_upload(data)])
    assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, pil_pixels(data))
    assert pixels.shape == ((3, 40, 24) if orientation >= 5 else (3, 24, 40))


def test_a_corrupt_jpeg_fails_alone_and_the_batch_is_decoded():
    good, other = UPLOADS["rgb"], UPLOADS["gray"]
    bad = corrupt_huffman_table(good)
    results = JpegDecoder(torch.device("cpu"))([as_upload(good), as_upload(bad), as_upload(other)])
    assert isinstance(results[1], UnusableImage) and results[1].problem == ImageProblem.INVALID
    assert torch.equal(results[0], pil_pixels(good)) and torch.equal(results[2], pil_pixels(other))


def test_an_image_the_decoder_refuses_is_decoded_by_pil(monkeypatch):
    """The decoder refuses one image (as nvJPEG may: an unusual JPEG PIL still reads): the batched call
    fails, the others are decoded one by one, and the refused one by PIL; a wrong-size answer too."""
    decoder = JpegDecoder(torch.device("cpu"))
    refused, wrong_size, fine = UPLOADS["rgb"], UPLOADS["gray"], UPLOADS["progressive"]
    real = decoder._decode_jpeg
    calls = []

    def picky(encoded, **kwargs):
        calls.append(len(encoded))
        if any(len(e) == len(refused) for e in encoded):
            raise RuntimeError("nvjpeg: unsupported")
        out = real(encoded, **kwargs)
        return [o[:, :8] if len(e) == len(wrong_size) else o for e, o in zip(encoded, out, strict=True)]

    monkeypatch.setattr(decoder, "_decode_jpeg", picky)
    results = decoder([as_upload(refused), as_upload(wrong_size), as_upload(fine)])
    assert calls == [3, 1, 1, 1]  # the batch, then one by one
    for data, pixels in zip((refused, wrong_size, fine), results, strict=True):
        assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, pil_pixels(data))


def test_warmup_runs_the_decoder_itself(monkeypatch):
    decoder = JpegDecoder(torch.device("cpu"))
    decoder.warmup(64, 48)

    def unavailable(*args, **kwargs):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(decoder, "_decode_jpeg", unavailable)
    with pytest.raises(RuntimeError, match="nvJPEG"):  # not hidden by the per-image PIL fallback
        decoder.warmup(64, 48)


@pytest.mark.gpu
def test_cuda_decode_matches_pil_within_tolerance():
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so pixels may differ by a few levels.
    On photo-like content the mean absolute difference stays under 2 levels (torchvision's own bound for
    its CUDA decoder against its CPU one, test_image.py::test_decode_jpegs_cuda); pure noise is only
    checked for shape."""
    device = torch.device("cuda")
    decoder = JpegDecoder(device)
    decoder.warmup()
    photo_like = {
        "gradients": encode(smooth_image(640, 480), "JPEG", quality=90),
        "textured": synthetic_jpeg(640, 480),
        "gray": encode(smooth_image(320, 240).convert("L")),
        "rotated": exif_jpeg(smooth_image(160, 120), 6),
    }
    uploads = {**UPLOADS, **photo_like}
    results = decoder([as_upload(d) for d in uploads.values()])
    for (name, data), pixels in zip(uploads.items(), results, strict=True):
        reference = pil_pixels(data)
        assert isinstance(pixels, torch.Tensor) and pixels.device.type == "cuda", name
        assert pixels.shape == reference.shape and pixels.dtype == torch.uint8, name
        if name in photo_like:
            diff = (pixels.cpu().float() - reference.float()).abs().mean()
            assert diff < 2, (name, diff)
    bad = decoder([as_upload(corrupt_huffman_table(UPLOADS["rgb"])), as_upload(UPLOADS["rgb"])])
    assert isinstance(bad[0], UnusableImage) and isinstance(bad[1], torch.Tensor)
