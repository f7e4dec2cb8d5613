"""Image-file decoding: limits before decoding, grayscale, fit with aspect ratio, inversion; each step
of the Fashion-MNIST conversion on a constructed image; odd and hostile files."""

from __future__ import annotations

import io
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.scoring_support import article, huge_png_header, jpeg_bytes, png_bytes
from zalando.data.idx import read_idx_images
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
    background_level,
    background_to_black,
    decode_image,
    extend_centred,
    negate,
    resize_longest_edge,
    sharpen,
    to_luma,
    trim_box,
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


# ----------------------------------------------------------------------------- the Fashion-MNIST conversion


def _encode(a: np.ndarray, fmt: str, mode: str | None = None, **kw: object) -> bytes:
    from PIL import Image

    im = Image.fromarray(a) if mode is None else Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _rect_on_white(
    shape: tuple[int, int] = (60, 40), box: tuple[int, int, int, int] = (15, 45, 10, 30)
) -> np.ndarray:
    a = np.full(shape, 255, np.uint8)
    top, bottom, left, right = box
    a[top:bottom, left:right] = 40
    return a


@pytest.mark.parametrize(("rgb", "luma"), [((255, 0, 0), 76), ((0, 255, 0), 150), ((0, 0, 255), 29)])
def test_colour_becomes_itu_601_luma(rgb: tuple[int, int, int], luma: int) -> None:
    from PIL import Image

    assert luma == round(np.dot([0.299, 0.587, 0.114], rgb))  # ITU-R 601-2
    solid = np.full((28, 28, 3), rgb, np.uint8)
    assert np.asarray(to_luma(Image.fromarray(solid, "RGB"))).tolist() == np.full((28, 28), luma).tolist()
    out = decode_image(png_bytes(solid, "RGB"), ImagePrepConfig(invert="never"))
    assert (out == luma).all()
    mixed = np.asarray(to_luma(Image.fromarray(np.full((9, 9, 3), (10, 200, 30), np.uint8), "RGB")))
    assert abs(int(mixed[0, 0]) - np.dot([0.299, 0.587, 0.114], (10, 200, 30))) <= 0.5


def test_trim_finds_the_article_box_and_ignores_what_is_close_to_the_background() -> None:
    rng = np.random.default_rng(0)
    a = np.clip(250 + rng.integers(-5, 6, size=(120, 90)), 0, 255).astype(np.uint8)  # a noisy white
    a[20:70, 15:45] = 30
    a[100, 80] = 240  # a faint smudge: 10 levels from the background, within 5% of 255
    assert background_level(a, 0.05) == pytest.approx(250, abs=5)
    assert trim_box(a, background_level(a, 0.05), 0.05) == (20, 70, 15, 45)
    a[110, 5] = 200  # a real mark outside the article: the box grows to hold it
    assert trim_box(a, background_level(a, 0.05), 0.05) == (20, 111, 5, 45)
    blank = np.full((30, 40), 255, np.uint8)
    assert trim_box(blank, 255, 0.05) == (0, 30, 0, 40)  # nothing stands out: nothing is cut


def test_background_is_the_colour_most_corners_share() -> None:
    a = np.full((64, 64), 250, np.uint8)
    a[:20, :20] = 10  # the article reaches the top-left corner
    assert background_level(a, 0.05) == 250
    a[44:, 44:] = 12  # and the bottom-right one: two corners against two, the first corner wins the tie
    assert background_level(a, 0.05) == pytest.approx(11)
    assert background_level(np.full((28, 28), 7, np.uint8), 0.05) == 7


def test_resize_puts_the_longest_edge_at_28() -> None:
    assert resize_longest_edge(np.zeros((60, 120), np.uint8)).shape == (14, 28)
    assert resize_longest_edge(np.zeros((90, 30), np.uint8)).shape == (28, 9)
    assert resize_longest_edge(np.zeros((7, 10), np.uint8)).shape == (20, 28)  # small ones grow
    assert resize_longest_edge(np.zeros((90, 30), np.uint8), stretch=True).shape == (28, 28)
    assert (resize_longest_edge(np.full((50, 50), 99, np.uint8)) == 99).all()


def test_sharpen_raises_contrast_at_outlines_and_leaves_flat_areas() -> None:
    flat = np.full((28, 20), 120, np.uint8)
    np.testing.assert_array_equal(sharpen(flat), flat)
    ramp = np.tile(
        np.repeat(np.array([60, 60, 60, 60, 60, 60, 90, 120, 150, 180, 180, 180, 180, 180]), 2), (10, 1)
    )
    ramp = ramp.astype(np.uint8)  # 10 x 28: a soft edge from 60 to 180
    out = sharpen(ramp)
    assert out[:, 11].max() < 60 and out[:, 18].min() > 180  # under- and overshoot beside the edge
    np.testing.assert_array_equal(out[:, :4], ramp[:, :4])  # far from the edge: untouched
    assert np.abs(np.diff(out.astype(int), axis=1)).max() > np.abs(np.diff(ramp.astype(int), axis=1)).max()
    np.testing.assert_array_equal(sharpen(ramp, percent=0), ramp)


def test_extend_centres_the_article_on_the_background() -> None:
    wide = extend_centred(np.full((14, 28), 9, np.uint8), 200)
    assert (
        wide.shape == (28, 28)
        and (wide[7:21] == 9).all()
        and (wide[:7] == 200).all()
        and (wide[21:] == 200).all()
    )
    tall = extend_centred(np.full((28, 13), 9, np.uint8), 0)
    assert (tall[:, 7:20] == 9).all() and (tall[:, :7] == 0).all() and (tall[:, 20:] == 0).all()


def test_negation_and_black_background() -> None:
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(negate(a), 255 - a)
    levelled = background_to_black(a, 55)
    assert levelled[a <= 55].max() == 0 and levelled.flat[255] == 255 and levelled.flat[155] == 128
    np.testing.assert_array_equal(background_to_black(a, 0), a)


def test_dark_rectangle_on_white_with_margins_is_trimmed_resized_centred_and_negated() -> None:
    canvas = _rect_on_white((200, 150), (30, 60, 10, 70))  # 30 x 60, near the top-left corner
    expected = np.zeros((28, 28), np.uint8)
    expected[7:21] = 215  # 60 wide -> 28, 30 tall -> 14, centred; 255 - 40
    np.testing.assert_array_equal(decode_image(png_bytes(canvas)), expected)
    old = decode_image(png_bytes(canvas), LEGACY)  # no trim: a small article off-centre
    assert (old > 100).sum() < 0.2 * (expected > 100).sum()


def test_a_grey_background_becomes_black() -> None:
    canvas = np.full((80, 60), 200, np.uint8)
    canvas[10:70, 20:40] = 40
    out = decode_image(png_bytes(canvas))
    assert (out[:, :9] == 0).all() and (out[:, 19:] == 0).all()  # 20 x 60 -> 9 x 28, padded
    assert (out[:, 10:18] == round((215 - 55) * 255 / 200)).all()
    kept = decode_image(png_bytes(canvas), ImagePrepConfig(black_background=False))
    assert (kept[:, :9] == 55).all() and (kept[:, 10:18] == 215).all()


def test_light_article_on_dark_is_not_negated_and_matches_its_negative() -> None:
    dark = article((140, 100), light_background=False)  # as Fashion-MNIST, larger
    out = decode_image(png_bytes(dark))
    assert out[14, 14] > 150 and out[0, 0] < 20
    diff = np.abs(decode_image(png_bytes(255 - dark)).astype(int) - out)
    assert diff.max() <= 4 and diff.mean() < 1  # rounding (of the background level too)


ASYMMETRIC = _rect_on_white((60, 40), (5, 55, 5, 15))  # a tall bar on the left ...
ASYMMETRIC[5:15, 15:35] = 40  # ... and an arm along the top: an upright "Γ"
# the stored pixels for each orientation tag: the tag tells the viewer how to turn them upright
STORED = {3: np.rot90(ASYMMETRIC, 2), 6: np.rot90(ASYMMETRIC, 1), 8: np.rot90(ASYMMETRIC, -1)}


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_the_pixels_upright_first(orientation: int) -> None:
    stored = np.ascontiguousarray(STORED[orientation])
    upright = decode_image(png_bytes(ASYMMETRIC))
    assert upright[:4, 12:22].min() > 150 and upright[7:, 12:].max() == 0  # the arm: top right
    tagged_png = _encode(stored, "PNG", exif=_exif(orientation))
    np.testing.assert_array_equal(decode_image(tagged_png), upright)
    assert not np.array_equal(decode_image(tagged_png, ImagePrepConfig(exif_transpose=False)), upright)
    tagged_jpeg = _encode(stored, "JPEG", quality=90, exif=_exif(orientation))
    assert np.abs(decode_image(tagged_jpeg).astype(int) - upright).mean() < 6


def test_corrupt_exif_is_ignored_quietly() -> None:
    data = _encode(_rect_on_white(), "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(data)
    assert out[14, 14] > 150 and out[14, 0] < 20


def test_fashion_mnist_pngs_pass_through_byte_identical(mini_dir: Path) -> None:
    images = read_idx_images(str(mini_dir / "t10k-images-idx3-ubyte.gz"))
    for a in images:
        assert decode_image(png_bytes(a)).tobytes() == a.tobytes()
    for a in images[:100]:  # a negative 28x28 (dark on white) is negated back, nothing else
        assert decode_image(png_bytes(255 - a)).tobytes() == a.tobytes()


def test_an_upscaled_article_on_white_with_margins_comes_back_close_to_the_original(mini_dir: Path) -> None:
    from PIL import Image

    errors = []
    for a in read_idx_images(str(mini_dir / "t10k-images-idx3-ubyte.gz"))[:40]:
        up = np.asarray(Image.fromarray(255 - a).resize((168, 168), Image.Resampling.BICUBIC))
        canvas = np.full((300, 260), 255, np.uint8)
        canvas[40:208, 70:238] = up
        errors.append(np.abs(decode_image(png_bytes(canvas)).astype(int) - a).mean())
    assert np.mean(errors) < 20, np.mean(errors)  # the legacy path: about 55 (a small article, off-centre)


HOSTILE_BUT_FINE = {
    "png_16bit": lambda a: _encode(a.astype(np.uint16) * 257, "PNG"),
    "rgba": lambda a: _encode(np.dstack([a, a, a, np.full_like(a, 255)]), "PNG"),
    "palette": lambda a: _encode(a, "PNG", "P"),
    "gif": lambda a: _encode(a, "GIF"),
    "webp": lambda a: _encode(np.dstack([a, a, a]), "WEBP", lossless=True),
    "bmp": lambda a: _encode(np.dstack([a, a, a]), "BMP"),
    "tiff": lambda a: _encode(a, "TIFF"),
    "webp_lossy": lambda a: _encode(np.dstack([a, a, a]), "WEBP", quality=80),
    "cmyk_jpeg": lambda a: _encode(np.dstack([a, a, a]), "JPEG", "CMYK", quality=90),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_BUT_FINE))
def test_odd_formats_are_converted_like_a_png(kind: str) -> None:
    out = decode_image(HOSTILE_BUT_FINE[kind](_rect_on_white()))
    expected = np.zeros((28, 28), np.uint8)
    expected[:, 4:23] = 215  # 20 x 30 -> 19 x 28, centred
    if kind in ("webp_lossy", "cmyk_jpeg"):
        assert np.abs(out.astype(int) - expected).mean() < 8
    else:
        np.testing.assert_array_equal(out, expected)


def test_transparent_palette_image_is_composited_on_white() -> None:
    from PIL import Image

    p = Image.fromarray(_rect_on_white()).convert("P")
    buf = io.BytesIO()
    p.save(buf, format="PNG", transparency=int(np.asarray(p)[0, 0]))  # the background index transparent
    expected = np.zeros((28, 28), np.uint8)
    expected[:, 4:23] = 215
    np.testing.assert_array_equal(decode_image(buf.getvalue()), expected)


def test_truncated_files_and_text_named_like_images_are_refused() -> None:
    jpeg = _encode(_rect_on_white((400, 300)), "JPEG", quality=90)
    assert _reason(jpeg[: len(jpeg) // 2]) == CORRUPT_IMAGE
    png = png_bytes(article((300, 200), light_background=True))
    assert _reason(png[: len(png) // 2]) == CORRUPT_IMAGE
    html = b"<!DOCTYPE html><html><head><title>photo.jpg</title></head><body>Not found</body></html>"
    with pytest.raises(ImageRejected, match="photo.jpg: no known image signature") as exc:
        decode_image(html, name="photo.jpg")
    assert exc.value.reason == NOT_AN_IMAGE
    assert _reason(b"") == EMPTY_FILE
