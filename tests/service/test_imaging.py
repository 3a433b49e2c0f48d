"""Header checks: which uploads the engine may decode (complete RGB/grayscale JPEGs), the size after EXIF
orientation, the same 4xx as a full decode, and ``UploadDecoding`` deciding which uploads the engine decodes."""

from __future__ import annotations

import pytest
from PIL import Image
from service_testing import encode, noise_image

from service.decoding import UploadDecoding
from service.imaging import ImageProblem, UnusableImage, decode_image, read_header

LIMITS = (40_000_000, 8)
BASE = noise_image(80, 64, seed=3)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(BASE, "JPEG", exif=exif)


@pytest.mark.parametrize(
    ("name", "data", "decodable"),
    [
        ("rgb jpeg", encode(BASE), True),
        ("progressive jpeg", encode(BASE, "JPEG", progressive=True), True),
        ("grayscale jpeg", encode(BASE.convert("L")), True),
        ("jpeg with trailing zero padding", encode(BASE) + b"\0" * 10, True),
        ("cmyk jpeg", encode(BASE.convert("CMYK")), False),
        ("truncated jpeg", encode(BASE)[:-300], False),
        ("png", encode(BASE, "PNG"), False),
    ],
)
def test_only_complete_rgb_or_grayscale_jpegs_are_left_to_the_engine(name, data, decodable):
    header = read_header(data, *LIMITS)
    assert header.plain_jpeg is decodable, name
    assert (header.width, header.height) == (80, 64)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_header_size_is_after_exif_orientation_like_the_decode(orientation):
    data = exif_jpeg(orientation)
    header = read_header(data, *LIMITS)
    decoded = decode_image(data, *LIMITS)
    assert header.orientation == orientation and header.plain_jpeg
    assert (header.width, header.height) == (decoded.width, decoded.height)


def test_header_errors_are_the_decode_errors():
    cases = [b"", b"hello, not an image" * 10, encode(noise_image(4, 4, 0), "PNG"), encode(BASE, "GIF")]
    for data in cases:
        with pytest.raises(UnusableImage) as from_header:
            read_header(data, *LIMITS)
        with pytest.raises(UnusableImage) as from_decode:
            decode_image(data, *LIMITS)
        assert from_header.value.problem == from_decode.value.problem
    with pytest.raises(UnusableImage) as too_large:
        read_header(encode(BASE), max_pixels=1000, min_side=8)
    assert too_large.value.problem == ImageProblem.TOO_LARGE


@pytest.mark.parametrize(
    ("engine", "jpeg", "png", "jpeg_with_host_pixels"),
    [("pil", True, True, False), ("nvjpeg", True, False, False), ("handler", False, False, False)],
)
def test_upload_decoding_says_which_uploads_the_engine_decodes(engine, jpeg, png, jpeg_with_host_pixels):
    jpeg_header, png_header = read_header(exif_jpeg(6), *LIMITS), read_header(encode(BASE, "PNG"), *LIMITS)
    decoding = UploadDecoding(engine)
    assert decoding.in_engine(jpeg_header) is jpeg and decoding.in_engine(png_header) is png
    assert decoding.in_engine(jpeg_header, host_pixels=True) is jpeg_with_host_pixels
    deferred = jpeg_header.deferred(b"bytes")
    assert (deferred.width, deferred.height, deferred.orientation, deferred.format) == (64, 80, 6, "JPEG")


def test_upload_decoding_follows_the_setting_and_the_device():
    from service.settings import Settings

    def choose(setting: str, device: str) -> str:
        return Settings(engine_decode=setting).serving_for(device).decode  # type: ignore[arg-type]

    assert [choose(s, "cuda") for s in ("auto", "on", "off")] == ["nvjpeg", "nvjpeg", "handler"]
    assert [choose(s, "cpu") for s in ("auto", "on", "off")] == ["pil", "pil", "handler"]


@pytest.mark.parametrize(
    ("size", "at_least", "decoded"),
    [
        ((1280, 960), 320, (640, 480)),  # 1/2: both sides still >= 320 (1/4 would give 240)
        ((1280, 960), 160, (320, 240)),  # 1/4
        ((640, 480), 320, (640, 480)),  # 1/2 would go under 320: decoded whole
        ((1280, 960), None, (1280, 960)),
    ],
)
def test_a_large_jpeg_is_decoded_at_the_smallest_scale_above_the_input(size, at_least, decoded):
    data = encode(noise_image(*size, seed=3))
    image = decode_image(data, 10**8, 8, at_least=at_least)
    assert (image.width, image.height) == decoded and image.pixels.shape == (3, decoded[1], decoded[0])
    png = encode(noise_image(*size, seed=3), "PNG")
    assert (decode_image(png, 10**8, 8, at_least=at_least).width, image.format) == (size[0], "JPEG")


def test_the_engines_decode_is_a_channels_last_view_of_the_same_pixels():
    from service.imaging import decode_pixels

    data = encode(noise_image(90, 70, seed=4))
    pixels = decode_pixels(data)
    assert pixels.shape == (3, 70, 90) and not pixels.is_contiguous() and pixels.stride() == (1, 270, 3)
    assert (pixels == decode_image(data, 10**8, 8).pixels).all()
