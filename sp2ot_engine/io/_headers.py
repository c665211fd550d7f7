"""Image type by magic bytes and pixel dimensions from the header, without decoding (torch-free).

:func:`probe` reads only what a format puts before its pixel data. For most formats that is
Pillow's own header parser (an ``ImageFile`` plugin parses the header in its constructor and
decodes nothing until ``load()``, which is never called here, and Pillow's decompression-bomb
check in ``Image.open`` is bypassed so that the caller's pixel budget decides). WebP and ICO
are parsed here: Pillow's WebP reader allocates the whole canvas when it opens a file, its ICO
reader decodes on open.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable

from PIL import Image, features

__all__ = ["IMAGE_SUFFIXES", "HeaderError", "ImageHeader", "archive_type", "image_type", "probe"]

#: Name endings of image files (only to tell "not an image" from "not a valid image").
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic", ".heif",
    ".psd", ".pcx", ".sgi", ".rgb", ".dds", ".icns", ".qoi",
})
_HEAD = 32  # bytes every magic test below needs at most


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format (``"png"``, ``"jpeg"``, ...) and stored size."""

    type: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


class HeaderError(Exception):
    """Not a supported image, or a header that cannot be read; ``str()`` is the skip reason."""


def _ftyp_brand(head: bytes) -> bytes:
    return head[8:12] if head[4:8] == b"ftyp" else b""


# type -> magic test on the first bytes, in the order they are tried.
_MAGIC: dict[str, Callable[[bytes], bool]] = {
    "jpeg": lambda h: h[:3] == b"\xff\xd8\xff",
    "png": lambda h: h[:8] == b"\x89PNG\r\n\x1a\n",
    "gif": lambda h: h[:6] in (b"GIF87a", b"GIF89a"),
    "bmp": lambda h: h[:2] == b"BM",
    "tiff": lambda h: h[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "webp": lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP",
    "ico": lambda h: h[:4] == b"\x00\x00\x01\x00",
    "ppm": lambda h: h[:1] == b"P" and h[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"f"),
    "jpeg2000": lambda h: h[:4] == b"\xff\x4f\xff\x51" or h[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    "psd": lambda h: h[:4] == b"8BPS",
    "qoi": lambda h: h[:4] == b"qoif",
    "dds": lambda h: h[:4] == b"DDS ",
    "sgi": lambda h: h[:2] == b"\x01\xda",
    "icns": lambda h: h[:4] == b"icns",
    "pcx": lambda h: h[:1] == b"\x0a" and h[1:2] in (b"\x00", b"\x02", b"\x03", b"\x05"),
    "avif": lambda h: _ftyp_brand(h) in (b"avif", b"avis"),
    "heif": lambda h: _ftyp_brand(h) in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"),
}
# type -> Pillow format whose plugin parses the header on construction (decoding waits for load()).
_PILLOW_FORMAT = {
    "jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "ppm": "PPM",
    "jpeg2000": "JPEG2000", "psd": "PSD", "qoi": "QOI", "dds": "DDS", "sgi": "SGI", "icns": "ICNS",
    "pcx": "PCX", "avif": "AVIF",
}
# Magic bytes of archives and compressed streams (a nested archive, whatever its name says).
_ARCHIVE_MAGIC: dict[str, Callable[[bytes], bool]] = {
    "zip": lambda h: h[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"),
    "gzip": lambda h: h[:2] == b"\x1f\x8b",
    "bzip2": lambda h: h[:3] == b"BZh",
    "xz": lambda h: h[:6] == b"\xfd7zXZ\x00",
    "7z": lambda h: h[:6] == b"7z\xbc\xaf\x27\x1c",
    "rar": lambda h: h[:7] == b"Rar!\x1a\x07\x00" or h[:8] == b"Rar!\x1a\x07\x01\x00",
    "zstd": lambda h: h[:4] == b"\x28\xb5\x2f\xfd",
}


def image_type(head: bytes) -> str | None:
    """The image type whose magic bytes start ``head``, or None."""
    return next((t for t, test in _MAGIC.items() if test(head)), None)


def archive_type(head: bytes) -> str | None:
    """The archive / compression format whose magic bytes start ``head``, or None (a tar is
    recognised by its ``ustar`` mark at byte 257 when ``head`` is that long)."""
    found = next((t for t, test in _ARCHIVE_MAGIC.items() if test(head)), None)
    return found or ("tar" if head[257:262] == b"ustar" else None)


def probe(fp: BinaryIO, name: str = "") -> ImageHeader:
    """Type and size of the image in ``fp`` (seekable, at its start), from the header only.

    Raises :class:`HeaderError` (the message is the reason) for a file that is not an image,
    a format that cannot be read, or a truncated or corrupt header. Errors of the underlying
    stream (e.g. a corrupt zip member) propagate unchanged.
    """
    head = fp.read(_HEAD)
    kind = image_type(head)
    if kind is None:
        if any(name.lower().endswith(s) for s in IMAGE_SUFFIXES):
            raise HeaderError("not a valid image: the content is not a recognised image format")
        raise HeaderError("not an image file")
    fp.seek(0)
    try:
        if kind == "webp":
            width, height = _webp_size(fp)
        elif kind == "ico":
            width, height = _ico_size(fp)
        elif kind in _PILLOW_FORMAT and _pillow_reads(kind):
            width, height = _pillow_size(fp, _PILLOW_FORMAT[kind], name)
        else:
            raise HeaderError(f"unsupported image format ({kind}): convert it to JPEG or PNG")
    except (SyntaxError, ValueError, OSError, EOFError, struct.error, IndexError, KeyError, TypeError) as e:
        raise HeaderError(f"truncated or corrupt image header ({kind}: {str(e).strip() or type(e).__name__})") from e
    if width <= 0 or height <= 0:
        raise HeaderError(f"corrupt image header ({kind}: size {width} x {height})")
    return ImageHeader(kind, int(width), int(height))


def _pillow_reads(kind: str) -> bool:
    if kind == "avif":
        return bool(features.check("avif"))
    if kind == "jpeg2000":
        return bool(features.check("jpg_2000"))
    return True


def _pillow_size(fp: BinaryIO, fmt: str, name: str) -> tuple[int, int]:
    Image.init()
    factory = Image.OPEN[fmt][0]
    # The constructor runs the plugin's header parser; pixel data is read only by load().
    im = factory(fp, name)
    return im.size


def _exact(fp: BinaryIO, n: int) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise EOFError(f"header ends after {len(data)} of {n} bytes")
    return data


def _webp_size(fp: BinaryIO) -> tuple[int, int]:
    """Canvas size from the first chunk: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    head = _exact(fp, 30)
    chunk = head[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L":
        if head[20] != 0x2F:
            raise SyntaxError("bad VP8L signature")
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        if head[23:26] != b"\x9d\x01\x2a":
            raise SyntaxError("bad VP8 start code")
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    raise SyntaxError(f"unknown WebP chunk {chunk!r}")


def _ico_size(fp: BinaryIO) -> tuple[int, int]:
    """The largest entry of the icon directory (the one a decoder would show); an entry that
    holds a PNG reports the PNG's own size (the directory says 0 for 256 and more)."""
    _, kind, count = struct.unpack("<HHH", _exact(fp, 6))
    if kind != 1 or count == 0:
        raise SyntaxError("not an icon directory")
    best = (0, 0, 0)  # (pixels, width, height)
    for _ in range(count):
        w, h, _colours, _res, _planes, _bpp, _size, offset = struct.unpack("<BBBBHHII", _exact(fp, 16))
        here = fp.tell()
        fp.seek(offset)
        png = fp.read(24)
        if png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == 24:
            w, h = struct.unpack(">II", png[16:24])
        else:
            w, h = w or 256, h or 256
        fp.seek(here)
        best = max(best, (w * h, w, h))
    return best[1], best[2]
