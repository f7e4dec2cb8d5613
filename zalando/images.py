"""Image files -> 28x28 uint8 arrays shaped like Fashion-MNIST (light article on a dark background).

The default (``mode="fashion_mnist"``) converts a photo the way Xiao, Rasul & Vollgraf (2017) made
Fashion-MNIST from Zalando's product photos, after applying the EXIF orientation and turning colour
into ITU-R 601-2 luma: (1) trim the edges close to the corner colour, (2) resize the longest edge to
28, (3) sharpen, (4) extend the shortest edge to 28 with the article centred, (5) negate when the
background is light, (6) 8-bit grayscale. The luma conversion comes first, so step 1 compares gray
levels where the paper measured distance in RGB (an article whose luma equals its background's is
invisible in the gray result either way). After step 5 the background is levelled to black
(``black_background``): the paper's photos were near-white, so negation made their background black,
as in every Fashion-MNIST image; a grey or coloured background would stay grey. A 28x28 image is
already that shape: it skips steps 1-4 and the levelling, so a Fashion-MNIST PNG comes back
byte-identical. ``mode="legacy"`` is the earlier conversion (no trim, sharpening or levelling; pad
with the border mean, invert when the border mean is light).

Size limits are checked on the header, BEFORE any pixel is decoded, so a 10,000x10,000 image costs
nothing. A rejected input raises :class:`ImageRejected` with a machine-readable ``reason`` code
that scoring writes to its quarantine rows.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from zalando.errors import DataError

log = logging.getLogger(__name__)

# reason codes (shared with zalando.scoring's quarantine rows)
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
CORRUPT_IMAGE = "corrupt_image"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
WRONG_SHAPE = "wrong_shape"
WRONG_MODE = "wrong_mode"

TARGET_SIZE = 28
EXIF_ORIENTATION = 0x0112  # the EXIF tag; PIL.ExifTags.Base.Orientation

# file signatures of the formats we accept, to tell "not an image" from "a broken image"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageRejected(DataError):
    """An image input that cannot be scored; ``reason`` is its quarantine reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ImagePrepConfig(BaseModel):
    """How an image file becomes a 28x28 Fashion-MNIST-like array. Each step can be switched off.

    The earlier conversion exactly: ``mode="legacy", exif_transpose=False``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="larger files are too_large")
    max_pixels: int = Field(
        default=16_000_000, gt=0, description="width*height above this is too_large (checked on the header)"
    )
    min_side: int = Field(default=8, ge=1, description="images with a side below this are too_small")
    formats: tuple[str, ...] = Field(
        default=("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"), description="Pillow formats accepted"
    )
    mode: Literal["fashion_mnist", "legacy"] = Field(
        default="fashion_mnist",
        description="fashion_mnist: trim, resize, sharpen, extend, negate as the data set was made; "
        "legacy: the earlier conversion (fit and invert on the border mean, no trim or sharpening)",
    )
    exif_transpose: bool = Field(
        default=True, description="turn the pixels upright by the EXIF orientation tag before anything else"
    )
    grayscale: bool = Field(
        default=True, description="convert colour to luminance; False: colour is wrong_mode"
    )
    trim: bool = Field(default=True, description="fashion_mnist: cut the edges close to the corner colour")
    trim_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="fashion_mnist: a pixel within this fraction of 255 of the corner colour is background "
        "(the paper's 5%); also how close corners must be to count as one background colour",
    )
    sharpen_radius: float = Field(
        default=1.0, ge=0, description="fashion_mnist: standard deviation of the unsharp mask's Gaussian"
    )
    sharpen_percent: int = Field(
        default=100, ge=0, description="fashion_mnist: unsharp mask strength; 0 switches sharpening off"
    )
    black_background: bool = Field(
        default=True,
        description="fashion_mnist: after negation, levels that make the background black (background "
        "-> 0, 255 stays 255), as in the data set; off: a grey or coloured background stays grey",
    )
    fit: Literal["pad", "stretch", "none"] = Field(
        default="pad",
        description="pad: keep the aspect ratio, longer side to 28, pad with the background; "
        "stretch: resize to 28x28; none: anything but 28x28 is wrong_shape",
    )
    invert: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="auto: invert when the background is above invert_threshold (fashion_mnist: the "
        "corner colour of the decoded image; legacy: the border mean after fitting)",
    )
    invert_threshold: float = Field(default=127.5, ge=0, le=255)
    alpha_background: int = Field(
        default=255, ge=0, le=255, description="transparent pixels become this value (white, like the photos)"
    )
    autocontrast: bool = Field(default=False, description="stretch the result to the full 0..255 range")


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file signature, or None when it is not one we know."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def looks_like_image(data: bytes) -> bool:
    return sniff_format(data) is not None


def _border_mean(a: np.ndarray) -> float:
    if a.shape[0] < 3 or a.shape[1] < 3:
        return float(a.mean())
    border = np.concatenate([a[0, :], a[-1, :], a[1:-1, 0], a[1:-1, -1]])
    return float(border.mean())


def decode_image(data: bytes, config: ImagePrepConfig | None = None, *, name: str = "image") -> np.ndarray:
    """Decode image bytes into a (28, 28) uint8 array, light article on dark background.

    Raises :class:`ImageRejected` (with a reason code) for anything that cannot be scored.
    """
    cfg = config or ImagePrepConfig()
    im = _open_checked(data, cfg, name)
    if cfg.exif_transpose:
        _apply_exif_orientation(im, name)
    gray = to_luma(im, cfg.alpha_background)
    out = _fashion_mnist(gray, cfg) if cfg.mode == "fashion_mnist" else _legacy(gray, cfg)
    if cfg.autocontrast:
        lo, hi = int(out.min()), int(out.max())
        if hi > lo:
            out = ((out.astype(np.float32) - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    return np.ascontiguousarray(out)


def _open_checked(data: bytes, cfg: ImagePrepConfig, name: str) -> Any:
    """The decoded Pillow image, after every check that can be made on the bytes and the header."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise ImageRejected(EMPTY_FILE, f"{name}: zero bytes")
    if len(data) > cfg.max_bytes:
        raise ImageRejected(TOO_LARGE, f"{name}: {len(data)} bytes > max_bytes {cfg.max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(NOT_AN_IMAGE, f"{name}: no known image signature (first bytes {data[:8]!r})")
    if fmt not in cfg.formats:
        raise ImageRejected(UNSUPPORTED_FORMAT, f"{name}: format {fmt} not in {list(cfg.formats)}")
    with warnings.catch_warnings():
        # we enforce our own (lower) pixel limit on the header below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # "Corrupt EXIF data" and the like: the pixels decode (or are refused below); one warning
        # per file would flood a batch's log
        warnings.simplefilter("ignore", UserWarning)
        try:
            im = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise ImageRejected(TOO_LARGE, f"{name}: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageRejected(
                CORRUPT_IMAGE, f"{name}: header unreadable ({e.__class__.__name__})"
            ) from None
        w, h = im.size
        if w * h > cfg.max_pixels:
            raise ImageRejected(TOO_LARGE, f"{name}: {w}x{h} pixels > max_pixels {cfg.max_pixels}")
        if min(w, h) < cfg.min_side:
            raise ImageRejected(TOO_SMALL, f"{name}: {w}x{h} pixels, a side is below min_side {cfg.min_side}")
        if cfg.fit == "none" and (w, h) != (TARGET_SIZE, TARGET_SIZE):
            raise ImageRejected(WRONG_SHAPE, f"{name}: {w}x{h} pixels, expected 28x28 (fit=none)")
        if not cfg.grayscale and im.mode not in ("L", "1", "I", "I;16", "LA"):
            raise ImageRejected(WRONG_MODE, f"{name}: mode {im.mode} is not grayscale (grayscale=False)")
        if fmt == "JPEG":
            # let libjpeg decode luma at a reduced scale: far less memory and time for big photos
            # (fashion_mnist keeps 8x the target so an article inside wide margins survives trimming)
            scale = 8 if cfg.mode == "fashion_mnist" else 4
            im.draft("L", (TARGET_SIZE * scale, TARGET_SIZE * scale))
        try:
            im.load()
        except Exception as e:  # truncated or corrupt pixel data: Pillow raises many kinds
            raise ImageRejected(
                CORRUPT_IMAGE, f"{name}: pixel data unreadable ({e.__class__.__name__})"
            ) from None
    return im


def _apply_exif_orientation(im: Any, name: str) -> None:
    """Turn the pixels upright in place as the EXIF orientation tag says (phones store them sideways)."""
    from PIL import ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data", as when opening
            if im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
                ImageOps.exif_transpose(im, in_place=True)
    except Exception as e:  # noqa: BLE001 - a malformed EXIF block fails in many ways; pixels are still fine
        log.warning("%s: EXIF orientation unreadable (%s), pixels used as stored", name, e.__class__.__name__)


def to_luma(im: Any, alpha_background: int = 255) -> Any:
    """Any Pillow image -> mode "L": ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B, Pillow's "L").

    Transparent pixels are composited on ``alpha_background`` (white by default, the photos'
    background); 16/32-bit and float gray is scaled by its maximum when that is above 255;
    palette, CMYK and bilevel images go through Pillow's own conversion.
    """
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (alpha_background,) * 3 + (255,))
        im = Image.alpha_composite(bg, rgba)
    if im.mode in ("I", "I;16", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    return im.convert("L")


def _legacy(gray: Any, cfg: ImagePrepConfig) -> np.ndarray:
    """The earlier conversion: fit (pad with the border mean / stretch), invert on the border mean."""
    from PIL import Image

    w, h = gray.size
    if cfg.fit == "stretch" or (w, h) == (TARGET_SIZE, TARGET_SIZE):
        if (w, h) != (TARGET_SIZE, TARGET_SIZE):
            gray = gray.resize((TARGET_SIZE, TARGET_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = np.asarray(gray, dtype=np.uint8)
        background = _border_mean(out)
    else:  # pad: longer side to 28, the other scaled, centred on the background colour
        scale = TARGET_SIZE / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = np.asarray(gray.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.uint8)
        background = _border_mean(small)
        out = np.full((TARGET_SIZE, TARGET_SIZE), round(background), dtype=np.uint8)
        top, left = (TARGET_SIZE - nh) // 2, (TARGET_SIZE - nw) // 2
        out[top : top + nh, left : left + nw] = small
    if cfg.invert == "always" or (cfg.invert == "auto" and background > cfg.invert_threshold):
        out = 255 - out
    return out


# ----------------------------------------------------------------------------- the Fashion-MNIST steps


def _fashion_mnist(gray: Any, cfg: ImagePrepConfig) -> np.ndarray:
    """Steps 1-6 of the data set's conversion on a luma image; a 28x28 image is taken as already
    converted: it skips steps 1-4 and the background levelling, and is only negated when light."""
    a = np.asarray(gray, dtype=np.uint8)
    background = background_level(a, cfg.trim_tolerance)
    fill = round(background)
    converted = a.shape == (TARGET_SIZE, TARGET_SIZE)
    if not converted:
        if cfg.trim:
            top, bottom, left, right = trim_box(a, background, cfg.trim_tolerance)
            a = a[top:bottom, left:right]
        a = resize_longest_edge(a, stretch=cfg.fit == "stretch")
        a = sharpen(a, cfg.sharpen_radius, cfg.sharpen_percent)
        a = extend_centred(a, fill)
    if cfg.invert == "always" or (cfg.invert == "auto" and background > cfg.invert_threshold):
        a, fill = negate(a), 255 - fill
    if cfg.black_background and not converted:
        a = background_to_black(a, fill)
    return a


def background_level(a: np.ndarray, tolerance: float) -> float:
    """The background's gray level: the colour most of the four corners agree on (within tolerance).

    Each corner is the median of a small patch (1/32 of the shorter side, at least one pixel), so
    JPEG noise does not move it; an article that reaches one or two corners is outvoted.
    """
    h, w = a.shape
    k = max(1, min(h, w) // 32)
    corners = [float(np.median(p)) for p in (a[:k, :k], a[:k, w - k :], a[h - k :, :k], a[h - k :, w - k :])]
    tol = tolerance * 255
    agree = [[d for d in corners if abs(c - d) <= tol] for c in corners]
    return float(np.mean(max(agree, key=len)))  # the first corner with the most agreement wins ties


def trim_box(a: np.ndarray, background: float, tolerance: float) -> tuple[int, int, int, int]:
    """Step 1: (top, bottom, left, right) of the rows and columns not all within tolerance of the
    background (the whole image when nothing stands out)."""
    tol = tolerance * 255  # background: ceil(background - tol) <= pixel <= floor(background + tol)
    lo, hi = min(max(math.ceil(background - tol), 0), 255), min(max(math.floor(background + tol), 0), 255)
    fg = (a < lo) | (a > hi)  # uint8 comparisons: no wide copy of a big photo
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return 0, a.shape[0], 0, a.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def resize_longest_edge(a: np.ndarray, size: int = TARGET_SIZE, *, stretch: bool = False) -> np.ndarray:
    """Step 2: the longest edge to ``size`` keeping the aspect ratio (``stretch``: both edges).

    Lanczos, not the paper's row/column skipping: subsampling a photo aliases its textures and
    JPEG noise into the 28 pixels that are left.
    """
    from PIL import Image

    h, w = a.shape
    if stretch:
        nw = nh = size
    else:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) == (w, h):
        return a
    img = Image.fromarray(a, "L").resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def sharpen(a: np.ndarray, radius: float = 1.0, percent: int = 100) -> np.ndarray:
    """Step 3: unsharp mask, a + percent/100 * (a - gaussian(a, radius)): the paper's Gaussian of
    radius and standard deviation 1.0, strongest near outlines and nothing on flat areas."""
    from PIL import Image, ImageFilter

    if radius <= 0 or percent <= 0:
        return a
    img = Image.fromarray(a, "L").filter(ImageFilter.UnsharpMask(radius=radius, percent=percent, threshold=0))
    return np.asarray(img, dtype=np.uint8)


def extend_centred(a: np.ndarray, fill: int, size: int = TARGET_SIZE) -> np.ndarray:
    """Step 4: a ``size`` x ``size`` canvas of ``fill`` (the background) with ``a`` in its centre."""
    h, w = a.shape
    out = np.full((size, size), fill, dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = a
    return out


def background_to_black(a: np.ndarray, level: int) -> np.ndarray:
    """After step 5: levels with the black point at the background (``level`` -> 0, 255 stays 255).

    The paper's photos had a near-white background, so negating made it black, as every
    Fashion-MNIST background is; a grey or coloured background would otherwise stay grey.
    """
    if level <= 0 or level >= 255:
        return a
    out = (a.astype(np.float32) - level) * (255.0 / (255 - level))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def negate(a: np.ndarray) -> np.ndarray:
    """Step 5: 255 - a; a dark article on a light background becomes light on dark, like the data set."""
    return (255 - a).astype(np.uint8)
