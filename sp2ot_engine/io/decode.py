"""Decoding to RGB (Pillow, torch-free): what every image becomes before a model sees it.

``to_rgb``: EXIF orientation is applied; every Pillow mode becomes RGB; 16-bit data is scaled
(``v * 255 / 65535``, so 65535 -> 255), not clipped; transparency (alpha channels, palette or
single-colour ``tRNS`` transparency) is composited over ``background`` (``"white"`` by
default, any Pillow colour name, ``"#rrggbb"`` or an ``(r, g, b)`` tuple).
"""
from __future__ import annotations

import io
import posixpath
from typing import Sequence

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from sp2ot_engine.io._headers import IMAGE_SUFFIXES

__all__ = ["DEFAULT_BACKGROUND", "ImageTooLarge", "decode_image", "describe_decode_error", "parse_background", "to_rgb"]

DEFAULT_BACKGROUND = "white"


def parse_background(background: str | Sequence[int]) -> tuple[int, int, int]:
    """``"white"``, ``"black"``, any Pillow colour string, or ``(r, g, b)`` -> ``(r, g, b)``."""
    if isinstance(background, str):
        try:
            rgb = ImageColor.getrgb(background)
        except ValueError:
            raise ValueError(
                f"background={background!r} is not a colour: use 'white', 'black', '#rrggbb' or (r, g, b)"
            ) from None
        return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]
    try:
        rgb = tuple(int(c) for c in background)
    except TypeError:
        raise ValueError(f"background={background!r} is not a colour") from None
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"background={background!r} must be three integers in 0..255")
    return rgb  # type: ignore[return-value]


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float single-channel image -> 8-bit "L", scaled, never clipped.

    - ``I;16*`` and ``I`` with values in 0..65535: ``round(v * 255 / 65535)``;
    - ``I`` outside that range: min-max stretch to 0..255;
    - ``F``: values in [0, 1] are scaled by 255, values in [0, 255] are rounded, anything else is
      min-max stretched; NaN/inf become 0.
    """
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            out = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = a
        else:
            out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        out = np.clip(np.rint(out), 0, 255)
    else:
        a = a.astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if im.mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
            out = (a * 255 + 32767) // 65535  # exact rounding of v/257
        else:
            out = ((a - lo) * 255 + (hi - lo) // 2) // (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not make a good image unusable
        return im
    if orientation in (None, 1):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def to_rgb(im: Image.Image, background: str | Sequence[int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Any Pillow image -> RGB: EXIF orientation applied, transparency flattened on ``background``."""
    bg = parse_background(background)
    im = _apply_exif_orientation(im)
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I") or mode == "F":  # I, I;16, I;16B, I;16L, I;16N, F
        return _high_depth_to_l(im).convert("RGB")
    if mode == "CMYK":
        icc = im.info.get("icc_profile")
        if icc:
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:
                pass  # fall back to Pillow's naive conversion
        return im.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        if mode == "La":
            im = im.convert("LA")
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, bg)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


class ImageTooLarge(ValueError):
    """The header promises more pixels than the caller's ``max_pixels``: nothing was decoded."""


def decode_image(
    data: bytes,
    background: str | Sequence[int] = DEFAULT_BACKGROUND,
    *,
    min_side: int | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode encoded image bytes fully and convert to RGB (see :func:`to_rgb`).

    ``min_side``: the caller only needs the shorter side to be at least this many pixels; JPEGs
    are then decoded at a reduced DCT scale (1/2, 1/4, 1/8) when that still satisfies it, which
    makes big photos several times cheaper. ``max_pixels``: an image whose header says more
    (width x height) raises :class:`ImageTooLarge` before any pixel is decoded (memory stays
    bounded whatever the file promises). Raises whatever Pillow raises on bad data.
    """
    im = Image.open(io.BytesIO(data))
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise ImageTooLarge(f"{im.width} x {im.height} = {im.width * im.height / 1e6:.1f} megapixels, over the "
                            f"limit of {max_pixels / 1e6:.1f}")
    if min_side and im.format == "JPEG":
        im.draft(None, (int(min_side), int(min_side)))
    im.load()
    return to_rgb(im, background)


def describe_decode_error(name: str, exc: BaseException) -> str:
    """Why an image that failed to decode is skipped, in words (``exc`` from :func:`decode_image`)."""
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (Image.DecompressionBombError, ImageTooLarge)):
        return f"image too large ({msg})"
    if isinstance(exc, UnidentifiedImageError):
        if posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES:
            return "not a valid image: the content is not a recognised image format"
        return "not an image file"
    if isinstance(exc, OSError) and "truncated" in msg.lower():
        return f"truncated image ({msg})"
    if isinstance(exc, MemoryError):
        return "image too large to decode"
    return f"corrupt or unsupported image ({type(exc).__name__}: {msg})"
