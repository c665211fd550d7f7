"""Images in: a folder or an archive (zip, tar, tar.gz/tgz, tar.bz2, tar.xz), streamed from disk
(Pillow, torch-free).

``scan_images(path)`` (alias ``ImageCollection.open``) applies the rules of
:mod:`sp2ot_engine.io.archive` (names, sizes, types by magic bytes, pixel counts from headers;
a bad archive raises ``ValueError``, a bad member is skipped), then verifies that every image
decodes (a full decode, converted to RGB exactly as ``load`` will do later), and returns an
:class:`ImageCollection` with

- ``names``: relative POSIX paths inside the folder/archive, sorted;
- ``skipped``: ``(name, reason)`` pairs for everything that is not used (non-images, corrupt or
  truncated files, hidden files and ``__MACOSX`` metadata, symbolic links in a folder,
  duplicates, nested archives, empty or oversized files);
- ``load(i) -> PIL.Image.Image`` in mode RGB (see :mod:`sp2ot_engine.io.decode`).

``ImageCollection.from_manifest(path, manifest)`` reads the images a manifest lists (written
when an upload was checked) without scanning again.

``on_decoded(name, image)`` (of :func:`scan_images` and of ``from_manifest(..., verify=True)``)
sees every image the verification decodes, once, as the RGB image the check made: a caller
can derive something cheap from it (the service makes its thumbnails there) instead of
decoding every image a second time.

Nothing is extracted to memory: members are read one at a time (see
:mod:`sp2ot_engine.io._sources`: a compressed tar is decompressed once into a temporary file,
deleted by ``close()``). Collections pickle cheaply (path + member table), so they work in
``DataLoader`` worker processes started with either fork or spawn.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Iterator, Sequence

from PIL import Image

from sp2ot_engine.io.archive import (
    DEFAULT_MAX_IMAGE_PIXELS,
    Limits,
    Manifest,
    Member,
    Source,
    build_manifest,
    open_source,
)
from sp2ot_engine.io.decode import DEFAULT_BACKGROUND, decode_image, describe_decode_error, parse_background

__all__ = ["ImageCollection", "ImageLoadError", "scan_images"]

ProgressFn = Callable[[int, int], None]
#: ``on_decoded(name, image)``: see :func:`scan_images`.
DecodedFn = Callable[[str, Image.Image], None]
#: The shorter side (in pixels) the verification decodes an image to at least (JPEGs may be
#: decoded at a reduced DCT scale; every byte is still decoded).
VERIFY_MIN_SIDE = 64


class ImageLoadError(RuntimeError):
    """An image that passed the scan could not be loaded any more (file changed or removed)."""


class ImageCollection:
    """A scanned, sorted set of images in a folder or an archive.

    Build with :meth:`open` (or :func:`scan_images`) or :meth:`from_manifest`. Attributes:
    ``names`` (sorted relative POSIX paths), ``members`` (the same images as
    :class:`~sp2ot_engine.io.archive.Member` records: size, type, width, height), ``skipped``
    (``(name, reason)`` sorted by name), ``source`` (the path given), ``kind`` (``"folder"``,
    ``"zip"``, ``"tar"``, ``"tar.gz"``, ``"tar.bz2"`` or ``"tar.xz"``), ``background``.
    """

    def __init__(self, source: str, manifest: Manifest, reader: Source,
                 background: str | Sequence[int] = DEFAULT_BACKGROUND, max_image_pixels: int | None = None):
        self.source = source
        self.max_image_pixels = max_image_pixels
        self.kind = manifest.kind
        self.members = list(manifest.members)
        self.names = [m.name for m in self.members]
        self.skipped = list(manifest.skipped)
        self._source_bytes = manifest.source_bytes
        self._reader = reader
        self.background = background
        self._bg = parse_background(background)

    @classmethod
    def open(cls, path: str | os.PathLike, *, background: str | Sequence[int] = DEFAULT_BACKGROUND,
             threads: int | None = None, cache_dir: str | os.PathLike | None = None,
             max_file_bytes: int | None = None, limits: Limits | None = None,
             progress: ProgressFn | None = None, on_decoded: DecodedFn | None = None) -> "ImageCollection":
        """Scan ``path`` (a folder, recursively, or an archive). See :func:`scan_images`."""
        return scan_images(path, background=background, threads=threads, cache_dir=cache_dir,
                           max_file_bytes=max_file_bytes, limits=limits, progress=progress,
                           on_decoded=on_decoded)

    @classmethod
    def from_manifest(cls, path: str | os.PathLike, manifest: Manifest, *,
                      background: str | Sequence[int] = DEFAULT_BACKGROUND,
                      cache_dir: str | os.PathLike | None = None, verify: bool = False,
                      threads: int | None = None, progress: ProgressFn | None = None,
                      on_decoded: DecodedFn | None = None,
                      max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> "ImageCollection":
        """The images ``manifest`` lists, read from ``path`` without scanning it again.

        The manifest must belong to ``path`` (same kind, same size in bytes). Its headers were
        checked but nothing was decoded: with ``verify=True`` every image is decoded once here
        and those that fail are skipped, as :func:`scan_images` does (``on_decoded`` as there);
        otherwise damaged pixel data surfaces as :class:`ImageLoadError` when the image is loaded.
        ``max_image_pixels``: no image whose header promises more pixels is decoded (it is
        skipped by the verification; ``load`` raises :class:`ImageLoadError`), whatever the
        manifest says (the budget may be lower now than when the manifest was written).
        """
        parse_background(background)
        spath = os.fspath(path)
        reader = open_source(spath, cache_dir=cache_dir)
        try:
            size = 0 if reader.kind == "folder" else os.path.getsize(spath)
            if (reader.kind, size) != (manifest.kind, manifest.source_bytes):
                raise ValueError(f"the manifest does not belong to {spath}: it lists a {manifest.kind} of "
                                 f"{manifest.source_bytes} bytes, this is a {reader.kind} of {size} bytes")
            if verify:
                manifest = _verified(reader, manifest, background, threads, progress, on_decoded,
                                     max_image_pixels)
            elif on_decoded is not None:
                raise ValueError("on_decoded needs verify=True: without it nothing is decoded here")
        except BaseException:
            reader.close()
            raise
        return cls(spath, manifest, reader, background, max_image_pixels)

    @property
    def manifest(self) -> Manifest:
        """The collection as a :class:`~sp2ot_engine.io.archive.Manifest` (to store and reopen)."""
        return Manifest(self.kind, self._source_bytes, list(self.members), list(self.skipped))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"ImageCollection({self.source!r}, kind={self.kind!r}, images={len(self.names)}, "
                f"skipped={len(self.skipped)})")

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        return self._reader.read(self.members[i].key)

    def open_bytes(self, i: int) -> BinaryIO:
        """The encoded bytes of image ``i`` as a readable binary file, streamed from the folder
        or archive (to copy a large image without holding it in memory); close it after use."""
        return self._reader.open(self.members[i].key)

    def load(self, i: int, *, background: str | Sequence[int] | None = None,
             min_side: int | None = None) -> Image.Image:
        """Image ``i`` as an RGB PIL image (EXIF-oriented, transparency flattened).

        ``min_side`` lets JPEG decoding shrink big photos while keeping the shorter side at least
        that long (see :func:`~sp2ot_engine.io.decode.decode_image`). Raises
        :class:`ImageLoadError` if the file changed or disappeared since the scan; IndexError
        for a bad index.
        """
        name = self.names[i]
        bg = self._bg if background is None else parse_background(background)
        try:
            return decode_image(self.read_bytes(i), bg, min_side=min_side, max_pixels=self.max_image_pixels)
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


def scan_images(
    path: str | os.PathLike,
    *,
    background: str | Sequence[int] = DEFAULT_BACKGROUND,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_file_bytes: int | None = None,
    limits: Limits | None = None,
    progress: ProgressFn | None = None,
    on_decoded: DecodedFn | None = None,
) -> ImageCollection:
    """Scan a folder (recursively) or an archive and verify every image decodes.

    ``limits``: the budgets of :mod:`sp2ot_engine.io.archive` (default :class:`Limits()`:
    256 MiB per file, Pillow's decompression-bomb pixel limit per image, no other limit);
    ``max_file_bytes`` overrides its per-file byte limit.
    ``threads``: decoding threads for the verification (default ``min(4, cpu_count)``).
    ``cache_dir``: where a compressed tar is decompressed to (default: system temp dir).
    ``progress(done, total)`` is called as candidates are verified.
    ``on_decoded(name, image)`` is called once for every image that decodes, with the RGB image
    the verification made (as ``load`` would make it, but JPEGs possibly at a reduced scale:
    its shorter side is at least ``max(VERIFY_MIN_SIDE, on_decoded.decode_min_side)``, the
    latter an optional attribute of the callable, as a transform's ``decode_min_side``). It runs
    in the verifying threads, in no particular order, so it must be thread-safe; what it raises
    stops the scan and propagates. Images that fail to decode never reach it.

    Raises ValueError (:class:`~sp2ot_engine.io.archive.ArchiveRejected`) if the path does not
    exist, is neither a folder nor a supported archive, or the archive is corrupt or breaks a
    whole-archive rule. Individual bad files never raise: they go to ``skipped``.
    """
    parse_background(background)  # validate early
    limits = limits or Limits()
    if max_file_bytes is not None:
        limits = dataclasses.replace(limits, max_member_bytes=max_file_bytes)
    reader = open_source(path, limits, cache_dir=cache_dir)
    try:
        manifest = _verified(reader, build_manifest(reader, limits), background, threads, progress, on_decoded,
                             limits.max_image_pixels)
    except BaseException:
        reader.close()
        raise
    return ImageCollection(os.fspath(path), manifest, reader, background, limits.max_image_pixels)


def _verified(reader: Source, manifest: Manifest, background: str | Sequence[int], threads: int | None,
              progress: ProgressFn | None, on_decoded: DecodedFn | None = None,
              max_image_pixels: int | None = None) -> Manifest:
    """``manifest`` without the images that fail a full decode (moved to ``skipped``); each
    image that decodes goes to ``on_decoded`` (see :func:`scan_images`)."""
    bg = parse_background(background)
    min_side = max(VERIFY_MIN_SIDE, int(getattr(on_decoded, "decode_min_side", 0) or 0))

    def check(member: Member) -> str | None:
        try:
            data = reader.read(member.key)
        except Exception as e:
            return f"cannot read ({e})"
        try:
            # A full decode (JPEGs at a reduced DCT scale: still every byte is decoded) + RGB conversion.
            image = decode_image(data, bg, min_side=min_side, max_pixels=max_image_pixels)
        except Exception as e:
            return describe_decode_error(member.name, e)
        if on_decoded is not None:
            on_decoded(member.name, image)  # outside the try: its errors are not the image's
        return None

    members = manifest.members
    n_threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    total = len(members)
    reasons: list[str | None] = []
    if n_threads > 1 and total > 1:
        pool = ThreadPoolExecutor(n_threads, thread_name_prefix="sp2ot-scan")
        try:
            for r in pool.map(check, members, chunksize=1):
                reasons.append(r)
                if progress is not None:
                    progress(len(reasons), total)
        finally:  # after an error (a callback's), the images not started yet are not checked
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for m in members:
            reasons.append(check(m))
            if progress is not None:
                progress(len(reasons), total)
    kept = [m for m, r in zip(members, reasons) if r is None]
    skipped = manifest.skipped + [(m.name, r) for m, r in zip(members, reasons) if r is not None]
    return dataclasses.replace(manifest, members=kept, skipped=sorted(skipped, key=lambda s: s[0]))
