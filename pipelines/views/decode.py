"""Decoding image bytes safely into RGB PIL images, at reduced size where the caller allows it.

Owns the format quirks: EXIF orientation, animated and multi-page files (first frame), palette,
alpha, CMYK and 16-bit modes, truncated files, and decompression bombs (the declared size is
checked before any pixel is decoded). Failures raise ``Rejected`` with a drop reason from
``pipelines.views.quality``; nothing here counts or logs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from pipelines.views.quality import TOO_LARGE, UNREADABLE

# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


class Rejected(Exception):
    """An image that cannot be used; ``reason`` is one of pipelines.views.quality.DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Open without decoding pixels; returns the image and its upright (width, height)."""
    if not data:
        raise Rejected(UNREADABLE, "empty file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides (below); Pillow still refuses twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise Rejected(TOO_LARGE, str(err)) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for garbage input
        raise Rejected(UNREADABLE, f"{type(err).__name__}: {err}") from None
    if width * height > max_pixels:
        raise Rejected(TOO_LARGE, f"{width}x{height} pixels declared")
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        orientation = 1
    # Pillow's TIFF reader already reports the upright size (it transposes while loading).
    if orientation in _TRANSPOSING_ORIENTATIONS and image.format != "TIFF":
        width, height = height, width
    return image, (width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the actual range to 8 bits rather than clip.
        pixels = np.asarray(image, dtype=np.float64)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(pixels)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as an image viewer would show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_image(
    data: bytes,
    max_pixels: int,
    reduce_to: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to an upright RGB image; returns it and the full-resolution upright size.

    ``reduce_to`` is called with the upright full size before any pixel is decoded; it may raise
    ``Rejected``, or return an upright (width, height) that lets JPEG decoding skip detail (the
    decoder picks the largest power-of-two reduction that still yields at least that size).
    """
    image, full_size = open_image(data, max_pixels)
    target = reduce_to(full_size) if reduce_to is not None else None
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
        if target is not None and image.format == "JPEG":
            w, h = target
            if image.getexif().get(_ORIENTATION_TAG, 1) in _TRANSPOSING_ORIENTATIONS:
                w, h = h, w
            image.draft("RGB", (w, h))
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image), full_size
    except Rejected:
        raise
    except Exception as err:  # noqa: BLE001 - truncated data, bad codecs, broken frames
        raise Rejected(UNREADABLE, f"{type(err).__name__}: {err}") from None
