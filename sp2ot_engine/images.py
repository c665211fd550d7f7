"""Images in: a folder or an archive (zip, tar, tar.gz/tgz, tar.bz2, tar.xz), streamed from disk.

``scan_images(path)`` (alias ``ImageCollection.open``) lists every regular file, verifies that it
decodes (a full decode, converted to RGB exactly as ``load`` will do later), and returns an
:class:`ImageCollection` with

- ``names``: relative POSIX paths inside the folder/archive, sorted;
- ``skipped``: ``(name, reason)`` pairs for everything that is not used (non-images, corrupt or
  truncated files, hidden files and ``__MACOSX`` metadata, symbolic links, unsafe archive paths
  such as ``../x.png`` or ``/etc/x.png``, duplicates, empty or oversized files);
- ``load(i) -> PIL.Image.Image`` in mode RGB.

Nothing is extracted to memory. Members are read one at a time: folder files by path, zip members
through a ``zipfile.ZipFile`` opened lazily in each process, tar members by ``(offset, size)``
with ``os.pread`` on a file descriptor opened lazily in each process. A compressed tar has no
random access, so it is decompressed once, while scanning, into a temporary ``.tar`` file on
disk (``cache_dir``, default the system temp dir), owned by the collection and deleted by
``close()`` / garbage collection / interpreter exit in the process that created it. Collections
pickle cheaply (path + member table), so they work in ``DataLoader`` worker processes started
with either fork or spawn.

Pixel conversion (``to_rgb``): EXIF orientation is applied; every Pillow mode becomes RGB;
16-bit data is scaled (``v * 255 / 65535``, so 65535 -> 255), not clipped; transparency
(alpha channels, palette or single-colour ``tRNS`` transparency) is composited over
``background`` (``"white"`` by default, any Pillow colour name, ``"#rrggbb"`` or an
``(r, g, b)`` tuple).
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "DEFAULT_BACKGROUND",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageCollection",
    "ImageDataset",
    "ImageLoadError",
    "EvalTransform",
    "ToNormalizedTensor",
    "TwoViews",
    "decode_image",
    "eval_transform",
    "make_loader",
    "parse_background",
    "scan_images",
    "collate_single_threaded",
    "single_threaded",
    "to_rgb",
    "train_transform",
]

DEFAULT_BACKGROUND = "white"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Files larger than this are skipped without being read (an image upload is never this big).
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024

_IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic", ".heif",
    ".psd", ".pcx", ".sgi", ".rgb", ".dds", ".icns", ".qoi",
}
_DRIVE = re.compile(r"^[A-Za-z]:")
_SUPPORTED = "a folder or an archive (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz)"


class ImageLoadError(RuntimeError):
    """An image that passed the scan could not be loaded any more (file changed or removed)."""


# --------------------------------------------------------------------------------------------
# Pixel conversion
# --------------------------------------------------------------------------------------------
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


def decode_image(
    data: bytes,
    background: str | Sequence[int] = DEFAULT_BACKGROUND,
    *,
    min_side: int | None = None,
) -> Image.Image:
    """Decode encoded image bytes fully and convert to RGB (see :func:`to_rgb`).

    ``min_side``: the caller only needs the shorter side to be at least this many pixels; JPEGs
    are then decoded at a reduced DCT scale (1/2, 1/4, 1/8) when that still satisfies it, which
    makes big photos several times cheaper. Raises whatever Pillow raises on bad data.
    """
    im = Image.open(io.BytesIO(data))
    if min_side and im.format == "JPEG":
        im.draft(None, (int(min_side), int(min_side)))
    im.load()
    return to_rgb(im, background)


def _describe_decode_error(name: str, exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({msg})"
    if isinstance(exc, UnidentifiedImageError):
        if posixpath.splitext(name)[1].lower() in _IMAGE_SUFFIXES:
            return "not a valid image: the content is not a recognised image format"
        return "not an image file"
    if isinstance(exc, OSError) and "truncated" in msg.lower():
        return f"truncated image ({msg})"
    if isinstance(exc, MemoryError):
        return "image too large to decode"
    return f"corrupt or unsupported image ({type(exc).__name__}: {msg})"


# --------------------------------------------------------------------------------------------
# Sources: where the bytes come from (picklable, per-process lazily opened handles)
# --------------------------------------------------------------------------------------------
class _FolderSource:
    kind = "folder"

    def __init__(self, root: str):
        self.root = root

    def read(self, key) -> bytes:
        with open(os.path.join(self.root, *key.split("/")), "rb") as f:
            return f.read()

    def close(self) -> None:
        pass


class _ZipSource:
    kind = "zip"

    def __init__(self, path: str):
        self.path = path
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def _handle(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():
            with self._lock:
                if self._zf is None or self._pid != os.getpid():
                    self._zf = zipfile.ZipFile(self.path)
                    self._pid = os.getpid()
        return self._zf

    def read(self, key) -> bytes:
        return self._handle().read(key)

    def close(self) -> None:
        if self._zf is not None and self._pid == os.getpid():
            self._zf.close()
        self._zf = None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _remove_if_owner(path: str, pid: int) -> None:
    if os.getpid() == pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _TarSource:
    """Plain (uncompressed) tar read by ``(offset, size)``; optionally owns a temporary spool file."""

    kind = "tar"

    def __init__(self, path: str, *, original: str | None = None, owned: bool = False):
        self.path = path
        self.original = original or path
        self._fd: int | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _remove_if_owner, path, os.getpid()) if owned else None

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = os.getpid()
        return self._fd

    def read(self, key) -> bytes:
        offset, size = key
        fd = self._handle()
        if hasattr(os, "pread"):
            chunks, done = [], 0
            while done < size:
                chunk = os.pread(fd, size - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
            data = b"".join(chunks)
        else:  # pragma: no cover - Windows
            with self._lock:
                os.lseek(fd, offset, os.SEEK_SET)
                data = os.read(fd, size)
        if len(data) != size:
            raise OSError(f"archive member is truncated ({len(data)} of {size} bytes present)")
        return data

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        if self._finalizer is not None:
            self._finalizer()  # deletes the spool file only in the creating process

    def __getstate__(self):
        # The spool file stays owned by the creating process: copies never delete it.
        return {"path": self.path, "original": self.original}

    def __setstate__(self, state):
        self.__init__(state["path"], original=state["original"])


# --------------------------------------------------------------------------------------------
# Enumeration of candidates
# --------------------------------------------------------------------------------------------
def _split_member_name(raw: str) -> tuple[str | None, str]:
    """Archive member name -> (normalised POSIX name or None if unsafe, display name)."""
    display = raw.replace("\\", "/")
    if display.startswith("/") or _DRIVE.match(display):
        return None, display
    parts = [p for p in display.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None, display
    return "/".join(parts), display


def _hidden_reason(name: str) -> str | None:
    parts = name.split("/")
    if "__MACOSX" in parts:
        return "macOS metadata (__MACOSX), not an image"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    return None


_UNSAFE = "unsafe path in archive (absolute or containing '..'), not read"
_Candidate = tuple  # (name, key, size)


def _walk_folder(root: str, skipped: list) -> Iterator[_Candidate]:
    def onerror(err: OSError) -> None:
        rel = os.path.relpath(err.filename, root).replace(os.sep, "/") if err.filename else "."
        skipped.append((rel, f"cannot read folder ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                skipped.append((rel_dir + d, "symbolic link, not followed"))
            elif d == "__MACOSX":
                skipped.append((rel_dir + d + "/", "macOS metadata folder (__MACOSX), not scanned"))
            elif d.startswith("."):
                skipped.append((rel_dir + d + "/", "hidden folder, not scanned"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            rel = rel_dir + f
            full = os.path.join(dirpath, f)
            if f.startswith("."):
                skipped.append((rel, "hidden file"))
                continue
            try:
                st = os.lstat(full)
            except OSError as e:
                skipped.append((rel, f"cannot read ({e.strerror or e})"))
                continue
            if stat.S_ISLNK(st.st_mode):
                skipped.append((rel, "symbolic link, not followed"))
            elif not stat.S_ISREG(st.st_mode):
                skipped.append((rel, "not a regular file"))
            else:
                yield rel, rel, st.st_size


def _walk_zip(zf: zipfile.ZipFile, skipped: list) -> Iterator[_Candidate]:
    for info in zf.infolist():
        if info.is_dir():
            continue
        name, display = _split_member_name(info.filename)
        if name is None:
            skipped.append((display, _UNSAFE))
            continue
        hidden = _hidden_reason(name)
        if hidden:
            skipped.append((name, hidden))
        elif stat.S_ISLNK(info.external_attr >> 16):
            skipped.append((name, "symbolic link, not followed"))
        elif info.flag_bits & 0x1:
            skipped.append((name, "encrypted (password-protected) archive member"))
        else:
            yield name, info.filename, info.file_size


def _walk_tar(tf: tarfile.TarFile, skipped: list) -> Iterator[_Candidate]:
    for m in tf:
        if m.isdir():
            continue
        name, display = _split_member_name(m.name)
        if name is None:
            skipped.append((display, _UNSAFE))
            continue
        hidden = _hidden_reason(name)
        if hidden:
            skipped.append((name, hidden))
        elif m.issym() or m.islnk():
            skipped.append((name, "link in archive, not followed"))
        elif not m.isreg():
            skipped.append((name, "not a regular file"))
        elif m.issparse():
            skipped.append((name, "sparse archive member, not supported"))
        else:
            yield name, (m.offset_data, m.size), m.size


# --------------------------------------------------------------------------------------------
# The collection
# --------------------------------------------------------------------------------------------
class ImageCollection:
    """A scanned, verified, sorted set of images in a folder or an archive.

    Build with :meth:`open` (or :func:`scan_images`). Attributes: ``names`` (sorted relative
    POSIX paths), ``skipped`` (``(name, reason)`` sorted by name), ``source`` (the path given),
    ``kind`` (``"folder"``, ``"zip"``, ``"tar"``, ``"tar.gz"``, ``"tar.bz2"`` or ``"tar.xz"``), ``background``.
    """

    def __init__(self, source: str, kind: str, names: list[str], keys: list, skipped: list[tuple[str, str]],
                 reader, background: str | Sequence[int] = DEFAULT_BACKGROUND):
        self.source = source
        self.kind = kind
        self.names = names
        self._keys = keys
        self.skipped = skipped
        self._reader = reader
        self.background = background
        self._bg = parse_background(background)

    @classmethod
    def open(cls, path: str | os.PathLike, *, background: str | Sequence[int] = DEFAULT_BACKGROUND,
             threads: int | None = None, cache_dir: str | os.PathLike | None = None,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
             progress: Callable[[int, int], None] | None = None) -> "ImageCollection":
        """Scan ``path`` (a folder, recursively, or an archive). See :func:`scan_images`."""
        return scan_images(path, background=background, threads=threads, cache_dir=cache_dir,
                           max_file_bytes=max_file_bytes, progress=progress)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"ImageCollection({self.source!r}, kind={self.kind!r}, images={len(self.names)}, "
                f"skipped={len(self.skipped)})")

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        return self._reader.read(self._keys[i])

    def load(self, i: int, *, background: str | Sequence[int] | None = None,
             min_side: int | None = None) -> Image.Image:
        """Image ``i`` as an RGB PIL image (EXIF-oriented, transparency flattened).

        ``min_side`` lets JPEG decoding shrink big photos while keeping the shorter side at least
        that long (see :func:`decode_image`). Raises :class:`ImageLoadError` if the file changed
        or disappeared since the scan; IndexError for a bad index.
        """
        name = self.names[i]
        bg = self._bg if background is None else parse_background(background)
        try:
            return decode_image(self.read_bytes(i), bg, min_side=min_side)
        except Exception as e:
            raise ImageLoadError(
                f"cannot load image {name!r} from {self.source}: {e} (it passed the scan: was the "
                f"file changed or removed since?)"
            ) from e

    def __iter__(self) -> Iterator[Image.Image]:
        for i in range(len(self)):
            yield self.load(i)

    def close(self) -> None:
        """Close file handles; delete the temporary spool file of a compressed tar (creator only)."""
        self._reader.close()

    def __enter__(self) -> "ImageCollection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"  # e.g. a self-extracting archive
    try:
        if len(head) >= 512 and tarfile.is_tarfile(path):
            return "tar"  # old v7 tar without the ustar magic
    except Exception:
        pass
    return "unknown"


def _spool(path: str, kind: str, cache_dir: str | os.PathLike | None) -> str:
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind]
    fd, tmp = tempfile.mkstemp(prefix="sp2ot-images-", suffix=".tar", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out, opener(path, "rb") as src:
            while True:
                try:
                    chunk = src.read(1 << 20)
                except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
                    raise ValueError(f"corrupt archive {path}: cannot decompress ({kind}): {e}") from e
                if not chunk:
                    break
                out.write(chunk)  # disk errors propagate as OSError, unchanged
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def scan_images(
    path: str | os.PathLike,
    *,
    background: str | Sequence[int] = DEFAULT_BACKGROUND,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> ImageCollection:
    """Scan a folder (recursively) or an archive and verify every image decodes.

    ``threads``: decoding threads for the verification (default ``min(4, cpu_count)``).
    ``cache_dir``: where a compressed tar is decompressed to (default: system temp dir).
    ``progress(done, total)`` is called as candidates are verified.

    Raises ValueError if the path does not exist, is neither a folder nor a supported archive,
    or the archive is corrupt. Individual bad files never raise: they go to ``skipped``.
    """
    parse_background(background)  # validate early
    spath = os.fspath(path)
    if not os.path.exists(spath):
        raise ValueError(f"{spath} does not exist")
    skipped: list[tuple[str, str]] = []
    if os.path.isdir(spath):
        reader = _FolderSource(spath)
        candidates = list(_walk_folder(spath, skipped))
    elif os.path.isfile(spath):
        kind = _sniff(spath)
        if kind == "unknown":
            raise ValueError(f"{spath} is not {_SUPPORTED}")
        if kind == "zip":
            try:
                with zipfile.ZipFile(spath) as zf:
                    candidates = list(_walk_zip(zf, skipped))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
                raise ValueError(f"corrupt zip archive {spath}: {e}") from e
            reader = _ZipSource(spath)
        else:
            if kind == "tar":
                reader = _TarSource(spath)
            else:
                tmp = _spool(spath, kind, cache_dir)
                reader = _TarSource(tmp, original=spath, owned=True)
            try:
                with tarfile.open(reader.path, "r:") as tf:
                    candidates = list(_walk_tar(tf, skipped))
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                reader.close()
                what = "tar archive" if kind == "tar" else f"{kind}-compressed file (not a valid tar inside)"
                raise ValueError(f"corrupt {what} {spath}: {e}") from e
    else:
        raise ValueError(f"{spath} is not {_SUPPORTED}")

    # Duplicates (possible in archives): keep the first occurrence.
    seen: set[str] = set()
    unique = []
    for name, key, size in candidates:
        if name in seen:
            skipped.append((name, "duplicate name in archive (first copy kept)"))
            continue
        seen.add(name)
        if size == 0:
            skipped.append((name, "empty file"))
        elif size > max_file_bytes:
            skipped.append((name, f"file too large ({size / 2**20:.0f} MiB, limit {max_file_bytes / 2**20:.0f} MiB)"))
        else:
            unique.append((name, key))
    unique.sort(key=lambda c: c[0])
    bg = parse_background(background)

    def check(cand) -> str | None:
        name, key = cand
        try:
            data = reader.read(key)
        except Exception as e:
            return f"cannot read ({e})"
        try:
            # A full decode (JPEGs at a reduced DCT scale: still every byte is decoded) + RGB conversion.
            decode_image(data, bg, min_side=64)
        except Exception as e:
            return _describe_decode_error(name, e)
        return None

    n_threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    total = len(unique)
    reasons: list[str | None] = []
    if n_threads > 1 and total > 1:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="sp2ot-scan") as pool:
            for r in pool.map(check, unique, chunksize=1):
                reasons.append(r)
                if progress is not None:
                    progress(len(reasons), total)
    else:
        for cand in unique:
            reasons.append(check(cand))
            if progress is not None:
                progress(len(reasons), total)
    names, keys = [], []
    for (name, key), reason in zip(unique, reasons):
        if reason is None:
            names.append(name)
            keys.append(key)
        else:
            skipped.append((name, reason))
    skipped.sort(key=lambda s: s[0])
    kind_name = reader.kind if reader.kind != "tar" or reader.original == reader.path else f"tar.{kind}"
    return ImageCollection(spath, kind_name, names, keys, skipped, reader, background)


# --------------------------------------------------------------------------------------------
# Torch side: dataset, transforms, loader
# --------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """``dataset[i] -> (transform(collection.load(i)), i)``.

    ``min_side`` (default: the transform's ``decode_min_side`` attribute, set by
    :func:`eval_transform` / :func:`train_transform`) lets big JPEGs decode at a reduced scale.
    With ``transform=None`` the PIL image itself is returned.
    """

    returns_index = True  # the second item of each sample is its dataset index

    def __init__(self, collection: ImageCollection, transform: Callable | None = None, *,
                 min_side: int | None = None):
        self.collection = collection
        self.transform = transform
        self.min_side = min_side if min_side is not None else getattr(transform, "decode_min_side", None)

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, i: int):
        # Per-image tensor ops are tiny: OpenMP parallel regions on them cost far more than the
        # work (7-27 ms instead of ~1 ms per 224-px image on the shared 2-core machine).
        # DataLoader workers already run single-threaded; do the same in the main process.
        with single_threaded():
            img = self.collection.load(i, min_side=self.min_side)
            return (self.transform(img) if self.transform is not None else img), i


_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


def _interp(name: str) -> InterpolationMode:
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"interpolation={name!r}: use one of {sorted(_INTERP)}") from None


def _default_resize(input_size: int, resize: int | None) -> int:
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    resize = int(round(input_size * 256 / 224)) if resize is None else int(resize)
    if resize < input_size:
        raise ValueError(f"resize ({resize}) must be >= input_size ({input_size})")
    return resize


_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ToNormalizedTensor:
    """PIL image or uint8 ``(3, H, W)`` tensor -> float32 ``(x / 255 - mean) / std`` in one pass.

    Same result as ``PILToTensor + ToDtype(scale=True) + Normalize``, without the intermediate
    tensors (about 4x cheaper per 224-px image).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std must be 3 values each, std > 0; got {mean}, {std}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, Image.Image):
            if img.mode != "RGB":
                img = img.convert("RGB")
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        else:
            x = torch.as_tensor(img)
            if x.dtype != torch.uint8:
                raise TypeError(f"ToNormalizedTensor expects a PIL image or a uint8 tensor, got {x.dtype}")
        return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(self._scale).add_(self._shift)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def _center_box(w: int, h: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """The source-pixel box that ``Resize(resize)`` then ``CenterCrop(size)`` keeps (torchvision's rounding)."""
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    sx, sy = w / nw, h / nh
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


class EvalTransform:
    """Shorter side to ``resize``, centre crop ``input_size``, normalised float tensor ``(3, S, S)``.

    For PIL images the resize and the crop are one ``Image.resize(box=...)`` (only the kept pixels
    are computed; equal to torchvision's Resize + CenterCrop up to 1-2 grey levels of rounding);
    other inputs go through torchvision ``v2.Resize`` / ``v2.CenterCrop``.
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], resize: int,
                 interpolation: str = "bicubic"):
        self.input_size, self.resize, self.interpolation = int(input_size), int(resize), interpolation
        self._resample = _PIL_RESAMPLE[interpolation]
        self._to_tensor = ToNormalizedTensor(mean, std)
        self._fallback = v2.Compose([v2.Resize(self.resize, interpolation=_interp(interpolation), antialias=True),
                                     v2.CenterCrop(self.input_size)])
        self.decode_min_side = self.resize  # see ImageDataset

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, Image.Image):
            s = self.input_size
            img = img.resize((s, s), self._resample, box=_center_box(img.width, img.height, self.resize, s))
            return self._to_tensor(img)
        return self._to_tensor(self._fallback(img))

    def __repr__(self) -> str:
        return (f"EvalTransform(input_size={self.input_size}, resize={self.resize}, "
                f"interpolation={self.interpolation!r}, {self._to_tensor!r})")


def eval_transform(input_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, resize: int | None = None, *,
                   interpolation: str = "bicubic") -> EvalTransform:
    """Resize the shorter side to ``resize`` (default ``input_size * 256 / 224``), centre-crop
    ``input_size``, to a normalised float tensor. Small images are upscaled (intended)."""
    resize = _default_resize(input_size, resize)
    _interp(interpolation)  # validate
    return EvalTransform(input_size, mean, std, resize, interpolation)


def train_transform(input_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, *, resize: int | None = None,
                    crop: str = "resize_crop", scale: tuple[float, float] = (0.2, 1.0),
                    flip: bool = True, color_jitter: float = 0.4, hue: float = 0.1,
                    jitter_p: float = 0.8, grayscale_p: float = 0.0,
                    interpolation: str = "bicubic") -> v2.Compose:
    """Augmentation for one view (method.md "Two augmented views").

    ``crop="resize_crop"`` (the paper's): shorter side to ``resize`` (default
    ``input_size * 256 / 224``), random ``input_size`` crop. ``crop="random_resized_crop"``:
    ``RandomResizedCrop(input_size, scale)``. Then horizontal flip, colour jitter (brightness,
    contrast, saturation ``color_jitter``, hue ``hue``) applied with probability ``jitter_p``,
    optional random grayscale, normalisation.
    """
    resize = _default_resize(input_size, resize)
    interp = _interp(interpolation)
    if crop == "resize_crop":
        ops: list = [v2.Resize(resize, interpolation=interp, antialias=True), v2.RandomCrop(input_size)]
        min_side = resize
    elif crop == "random_resized_crop":
        ops = [v2.RandomResizedCrop(input_size, scale=scale, interpolation=interp, antialias=True)]
        min_side = None
    else:
        raise ValueError(f"crop={crop!r}: use 'resize_crop' or 'random_resized_crop'")
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    # Colour ops on the PIL image: torchvision's tensor hue shift is ~5x slower than PIL's
    # (3.2 vs 0.6 ms at 96 px; the whole view 4.7 vs ~1.9 ms), and full mode augments two views
    # of every image every epoch.
    if color_jitter > 0 or hue > 0:
        jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=hue)
        ops.append(v2.RandomApply([jitter], p=jitter_p))
    if grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=grayscale_p))
    ops.append(v2.PILToTensor())
    ops.append(ToNormalizedTensor(mean, std))
    t = v2.Compose(ops)
    t.decode_min_side = min_side
    return t


class TwoViews:
    """``TwoViews(t)(img) -> (t(img), t(img))``: two independent augmentations (or ``t``, ``t2``)."""

    def __init__(self, transform: Callable, transform2: Callable | None = None):
        self.transform = transform
        self.transform2 = transform2 if transform2 is not None else transform
        a, b = (getattr(t, "decode_min_side", None) for t in (self.transform, self.transform2))
        self.decode_min_side = None if a is None or b is None else max(a, b)

    def __call__(self, img):
        return self.transform(img), self.transform2(img)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r}, {self.transform2!r})"


class single_threaded:
    """Context manager: torch intra-op threads = 1 inside (restored on exit); a no-op when already 1.

    Per-sample and per-batch data work (transforms, collation) is small and memory-bound; in a
    process whose torch thread pool is sized for the model, each tiny op pays for an OpenMP
    parallel region, which on a busy machine costs several times the work itself.
    """

    def __enter__(self):
        self.threads = torch.get_num_threads()
        if self.threads > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.threads > 1:
            torch.set_num_threads(self.threads)


def collate_single_threaded(batch):
    """``default_collate`` with torch intra-op threads = 1 (see :class:`single_threaded`)."""
    with single_threaded():
        return default_collate(batch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds torch and `random` per worker from the loader's generator; numpy too, here.
    np.random.seed(torch.initial_seed() % 2**32)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False, *, device: str | torch.device | None = None,
                persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                multiprocessing_context=None) -> DataLoader:
    """A DataLoader: seeded generator (reproducible shuffling and augmentation), worker processes
    (persistent by default when ``num_workers > 0``), ``pin_memory`` only for a CUDA ``device``
    (default: pinned iff CUDA is available and no CPU device was asked for). Batches are collated
    single-threaded (:func:`collate_single_threaded`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    if device is None:
        pin = torch.cuda.is_available()
    else:
        pin = torch.device(device).type == "cuda"
    kwargs = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        kwargs["worker_init_fn"] = _seed_worker
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = multiprocessing_context
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=g, drop_last=drop_last, pin_memory=pin,
                      collate_fn=collate_single_threaded, **kwargs)
