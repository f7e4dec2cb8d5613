"""Image files -> 28x28 uint8 arrays shaped like Fashion-MNIST (light article on a dark background).

Every step is configurable through :class:`ImagePrepConfig`: size limits (checked on the header,
BEFORE any pixel is decoded, so a 10,000x10,000 image costs nothing), grayscale conversion,
fitting to 28x28 keeping the aspect ratio (padding with the background), and inversion when the
background is light (mean of the border pixels). A rejected input raises :class:`ImageRejected`
with a machine-readable ``reason`` code that scoring writes to its quarantine rows.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Literal

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
    """How an image file becomes a 28x28 Fashion-MNIST-like array. Each step can be switched off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="larger files are too_large")
    max_pixels: int = Field(
        default=16_000_000, gt=0, description="width*height above this is too_large (checked on the header)"
    )
    min_side: int = Field(default=8, ge=1, description="images with a side below this are too_small")
    formats: tuple[str, ...] = Field(
        default=("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"), description="Pillow formats accepted"
    )
    grayscale: bool = Field(
        default=True, description="convert colour to luminance; False: colour is wrong_mode"
    )
    fit: Literal["pad", "stretch", "none"] = Field(
        default="pad",
        description="pad: keep the aspect ratio, longer side to 28, pad with the background; "
        "stretch: resize to 28x28; none: anything but 28x28 is wrong_shape",
    )
    invert: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto: invert when the border mean is above invert_threshold"
    )
    invert_threshold: float = Field(default=127.5, ge=0, le=255)
    alpha_background: int = Field(
        default=255, ge=0, le=255, description="transparent pixels become this value"
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
    from PIL import Image, UnidentifiedImageError

    cfg = config or ImagePrepConfig()
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
            # let libjpeg decode at a reduced scale: far less memory and time for big photos
            im.draft("L", (TARGET_SIZE * 4, TARGET_SIZE * 4))
        try:
            im.load()
        except Exception as e:  # truncated or corrupt pixel data: Pillow raises many kinds
            raise ImageRejected(
                CORRUPT_IMAGE, f"{name}: pixel data unreadable ({e.__class__.__name__})"
            ) from None
    return _prepare(im, cfg)


def _prepare(im: object, cfg: ImagePrepConfig) -> np.ndarray:
    from PIL import Image

    assert isinstance(im, Image.Image)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (cfg.alpha_background,) * 3 + (255,))
        im = Image.alpha_composite(bg, rgba)
    if im.mode in ("I", "I;16", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    gray = im.convert("L")
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
    if cfg.autocontrast:
        lo, hi = int(out.min()), int(out.max())
        if hi > lo:
            out = ((out.astype(np.float32) - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    return np.ascontiguousarray(out)
