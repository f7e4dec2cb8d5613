"""Image-file decoding: limits before decoding, grayscale, fit with aspect ratio, inversion."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

from tests.scoring_support import article, huge_png_header, jpeg_bytes, png_bytes
from zalando.images import (
    CORRUPT_IMAGE,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TOO_SMALL,
    WRONG_MODE,
    WRONG_SHAPE,
    ImagePrepConfig,
    ImageRejected,
    decode_image,
)


LEGACY = ImagePrepConfig(mode="legacy", exif_transpose=False)  # the conversion before issue 17


def _reason(data: bytes, cfg: ImagePrepConfig | None = None) -> str:
    with pytest.raises(ImageRejected) as exc:
        decode_image(data, cfg, name="x")
    return exc.value.reason


def test_dark_28x28_png_is_unchanged() -> None:
    a = article((28, 28), light_background=False)
    out = decode_image(png_bytes(a))
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    np.testing.assert_array_equal(out, a)


def test_light_background_is_inverted_and_never_is_respected() -> None:
    a = article((28, 28), light_background=True)
    np.testing.assert_array_equal(decode_image(png_bytes(a)), 255 - a)
    np.testing.assert_array_equal(decode_image(png_bytes(a), ImagePrepConfig(invert="never")), a)
    dark = article((28, 28), light_background=False)
    np.testing.assert_array_equal(decode_image(png_bytes(dark), ImagePrepConfig(invert="always")), 255 - dark)


@pytest.mark.parametrize("mode", ["fashion_mnist", "legacy"])
@pytest.mark.parametrize("light", [True, False])
def test_jpeg_colour_wide_image_is_fitted_keeping_aspect_ratio(light: bool, mode: str) -> None:
    gray = article((100, 200), light_background=light)
    rgb = np.stack([gray, gray, gray], axis=-1)
    out = decode_image(jpeg_bytes(rgb, "RGB"), ImagePrepConfig(mode=mode))
    assert out.shape == (28, 28)
    # 200x100 -> 28x14 centred: rows 0-6 and 21-27 are padding, which must be dark (background after inversion)
    assert out[:6].mean() < 30 and out[22:].mean() < 30
    assert out[10:18, 10:18].mean() > 150  # the article is bright
    stretched = decode_image(jpeg_bytes(rgb, "RGB"), ImagePrepConfig(mode=mode, fit="stretch"))
    assert stretched[:6].mean() > out[:6].mean() + 20  # stretching fills the rows padding left dark


def test_transparent_png_is_composited_on_the_light_background() -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (50, 50, 50, 255)  # an opaque dark article, transparent around it
    out = decode_image(png_bytes(rgba, "RGBA"), LEGACY)
    assert out[0, 0] == 0 and out[14, 14] > 150  # background white -> inverted to black
    # fashion_mnist trims the transparent (now white) margin: the square fills the frame, light
    np.testing.assert_array_equal(decode_image(png_bytes(rgba, "RGBA")), np.full((28, 28), 205, np.uint8))
    rgba[10:30, 20:30, 3] = 0  # the right half transparent too: a 10x20 article, padded left and right
    out = decode_image(png_bytes(rgba, "RGBA"))
    assert (out[:, :7] == 0).all() and (out[:, 21:] == 0).all() and (out[:, 7:21] == 205).all()


def test_bad_inputs_get_reason_codes() -> None:
    assert _reason(b"") == EMPTY_FILE
    assert _reason(b"image_id,label\n1,2\n") == NOT_AN_IMAGE
    good = png_bytes(article((28, 28), light_background=False))
    assert _reason(good[:60]) == CORRUPT_IMAGE
    assert _reason(png_bytes(np.zeros((1, 1), np.uint8))) == TOO_SMALL
    assert decode_image(png_bytes(np.full((1, 1), 9, np.uint8)), ImagePrepConfig(min_side=1)).shape == (
        28,
        28,
    )
    assert _reason(png_bytes(np.zeros((30, 30), np.uint8)), ImagePrepConfig(fit="none")) == WRONG_SHAPE
    colour = np.zeros((28, 28, 3), np.uint8)
    assert _reason(png_bytes(colour, "RGB"), ImagePrepConfig(grayscale=False)) == WRONG_MODE
    assert _reason(good, ImagePrepConfig(max_bytes=10)) == TOO_LARGE


def test_huge_image_is_rejected_from_its_header_without_decoding() -> None:
    data = huge_png_header(10_000, 10_000)
    assert len(data) < 1000
    tracemalloc.start()
    try:
        assert _reason(data) == TOO_LARGE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # a decoded 10,000x10,000 image would need 100 MB


def test_big_jpeg_within_limits_decodes_small() -> None:
    a = article((1200, 800), light_background=True)
    data = jpeg_bytes(a, quality=80)
    out = decode_image(data, LEGACY)
    assert out.shape == (28, 28) and out[14, 14] > 150 and out[0, 14] < 40
    out = decode_image(data)  # trimmed: the ellipse (960x560) touches top and bottom, 16 wide
    assert out.shape == (28, 28) and out[14, 14] > 150 and out[0, 14] > 150 and out[14, :5].max() < 40
    img_cfg = ImagePrepConfig(max_pixels=500_000)
    with pytest.raises(ImageRejected, match="max_pixels"):
        decode_image(io.BytesIO(data).getvalue(), img_cfg)
