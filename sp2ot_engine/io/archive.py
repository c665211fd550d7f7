"""Reading a folder or an archive of images without decoding them (torch-free): one rule per
kind of bad member, and a manifest of what may be used.

:func:`inspect_archive` (or :func:`open_source` + :func:`build_manifest`) lists a folder
(recursively) or a zip / tar / tar.gz (tgz) / tar.bz2 / tar.xz archive (recognised by its
first bytes, not its name), checks its structure and every member's name, size, type (by
magic bytes) and pixel count (from the image header: nothing is decoded), and returns a
:class:`Manifest`: the accepted members (name, size, type, width, height, and where to read
it) and the skipped ones with their reasons. The manifest is written and read as JSON next to
a stored upload (:meth:`Manifest.write`, :meth:`Manifest.read`, :func:`manifest_path`), and
:meth:`sp2ot_engine.io.collection.ImageCollection.from_manifest` reads the images from it
later without scanning again. Every limit is a :class:`Limits` field; ``None`` turns it off.

Rules, checked in this order; the first that applies decides. A *rejection* raises
:class:`ArchiveRejected` (a ``ValueError``): nothing is used; its ``rule`` (a
:class:`Rejection`, in brackets below) tells a caller which rule it was, e.g. to name the
setting behind a limit. A *skip* leaves the member out and reports ``(name, reason)`` in
``Manifest.skipped``.

=====================================================  ==========================================
kind                                                   rule
=====================================================  ==========================================
missing path                                           reject [missing]
empty file                                             reject [empty]
not a folder or an archive                             reject [not_archive]
unreadable archive (corrupt, truncated, bad stream)    reject [corrupt]
member name escaping the archive (absolute, drive      reject [unsafe_name] (zip-slip: it would
letter, ``..``) or containing NUL                      write outside the destination if extracted)
link in an archive (symbolic or hard)                  reject [link] (links are the other zip-slip)
special member in an archive (device, FIFO, sparse)    reject [special]
encrypted (password-protected) zip member              reject [encrypted]
more files than ``max_members``                        reject [too_many_files]
uncompressed total over ``max_total_bytes``            reject [too_large] (declared sizes for zip
                                                       and tar; counted while decompressing a tar.gz)
uncompressed/compressed over ``max_ratio`` (past       reject [bomb] (an archive bomb)
``ratio_floor`` bytes)
directory entry                                        ignored (not a member)
symbolic link in a folder                              skip (not followed: the user's own file
                                                       system, never extracted)
special file in a folder (device, FIFO, socket)        skip (never opened: reading may block)
hidden file or folder, ``__MACOSX`` metadata           skip
name not valid UTF-8                                   skip
a part of the name longer than ``max_name_bytes``      skip (no file system could store it)
duplicate name (archives)                              skip (the first copy is kept)
empty file                                             skip
file over ``max_member_bytes``                         skip
nested archive (by name or by magic bytes)             skip (never opened: one level only)
member that cannot be read (corrupt zip member)        skip
no image magic bytes                                   skip ("not an image file", or "not a valid
                                                       image" when the name says image)
image format without a header reader (HEIF, TGA)       skip
truncated or corrupt image header                      skip
image over ``max_image_pixels`` (width x height)       reject [image_too_large] (a decompression
                                                       bomb: a header can promise gigapixels in
                                                       a few bytes; the message names the image)
total pixels over ``max_total_pixels``                 reject [too_many_pixels]
=====================================================  ==========================================

An archive with no file, or with no usable image, is not rejected here: the manifest says so
(``members`` empty; ``skipped`` lists why) and the caller words its own error. Damage inside
the pixel data (a JPEG cut after its header) is not seen without decoding: the caller that
decodes (:func:`sp2ot_engine.io.collection.scan_images`) skips such images.

The service (``app/uploads/ingest.py``) checks an upload with this module and nothing else:
it stores the archive as it came, with its manifest next to it, and its worker reads the
images through the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import lzma
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sp2ot_engine.io._headers import HeaderError, archive_type, probe
from sp2ot_engine.io._sources import FolderSource, Key, Source, TarSource, ZipSource, sniff_kind, spool

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_MEMBER_BYTES",
    "ArchiveRejected",
    "Limits",
    "Manifest",
    "Member",
    "Rejection",
    "Source",
    "build_manifest",
    "inspect_archive",
    "manifest_path",
    "open_source",
    "upload_of_manifest",
]

#: Files larger than this are skipped without being read (an image upload is never this big).
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Pillow's own decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS``), the default pixel cap.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
MAX_NAME_BYTES = 255  # NAME_MAX of common file systems, per part of a path
SUPPORTED = "a folder or an archive (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz)"
NESTED_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".tgz", ".tar.gz", ".gz", ".tbz", ".tbz2", ".tar.bz2", ".bz2", ".txz",
    ".tar.xz", ".xz", ".7z", ".rar", ".zst", ".tar.zst", ".lz", ".lzma", ".z", ".cab", ".jar",
)
MANIFEST_SUFFIX = ".manifest.json"
_MANIFEST_FORMAT = "sp2ot-manifest"
_MANIFEST_VERSION = 1
_DRIVE = re.compile(r"^[A-Za-z]:")
_HEAD = 512  # bytes read to tell a nested archive from an image
_MB = 1_000_000


class Rejection:
    """Which rule rejected a folder/archive (``ArchiveRejected.rule``); see the rule table."""

    MISSING = "missing"
    EMPTY = "empty"
    NOT_ARCHIVE = "not_archive"
    CORRUPT = "corrupt"
    UNSAFE_NAME = "unsafe_name"
    LINK = "link"
    SPECIAL = "special"
    ENCRYPTED = "encrypted"
    TOO_MANY_FILES = "too_many_files"
    TOO_LARGE = "too_large"
    BOMB = "bomb"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_PIXELS = "too_many_pixels"


class ArchiveRejected(ValueError):
    """The whole folder/archive is refused. ``reason`` says why without naming the local path
    (for an API answer); ``rule`` is the :class:`Rejection` that applied; ``member`` is the
    offending member's name, if one; ``str()`` starts with the path."""

    def __init__(self, source: str, reason: str, member: str | None = None, *, rule: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason, self.member, self.rule = source, reason, member, rule


@dataclass(frozen=True)
class Limits:
    """Budgets of one folder/archive; ``None`` turns a limit off. See the module's rule table."""

    max_members: int | None = None
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES
    max_total_bytes: int | None = None
    max_ratio: float | None = None
    ratio_floor: int = 0
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_total_pixels: int | None = None
    max_name_bytes: int = MAX_NAME_BYTES


@dataclass(frozen=True)
class Member:
    """An accepted image: its name (relative POSIX path), size in bytes, type by magic bytes
    (``"png"``, ``"jpeg"``, ...), stored width and height (before any EXIF rotation), and the
    key its source reads it by (folder: the name; zip: the local header offset; tar:
    ``(offset, size)`` in the uncompressed tar)."""

    name: str
    size: int
    type: str
    width: int
    height: int
    key: Key

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class Manifest:
    """What :func:`build_manifest` found: accepted ``members`` and ``skipped`` ``(name, reason)``
    pairs, both sorted by name; ``kind`` of the source (``"folder"``, ``"zip"``, ``"tar"``,
    ``"tar.gz"``, ``"tar.bz2"``, ``"tar.xz"``) and its size in bytes (0 for a folder), which
    a reader checks before trusting the member keys."""

    kind: str
    source_bytes: int
    members: list[Member] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def total_pixels(self) -> int:
        return sum(m.pixels for m in self.members)

    def to_json(self) -> dict[str, Any]:
        members = []
        for m in self.members:
            row = asdict(m)
            if self.kind == "folder":
                del row["key"]  # the name is the key
            elif isinstance(m.key, tuple):
                row["key"] = list(m.key)
            members.append(row)
        return {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "kind": self.kind,
                "source_bytes": self.source_bytes, "members": members,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Manifest":
        if doc.get("format") != _MANIFEST_FORMAT or doc.get("version") != _MANIFEST_VERSION:
            raise ValueError(f"not an sp2ot manifest of version {_MANIFEST_VERSION} "
                             f"(format {doc.get('format')!r}, version {doc.get('version')!r})")
        members = []
        for row in doc["members"]:
            key = row.get("key", row["name"])
            members.append(Member(row["name"], int(row["size"]), row["type"], int(row["width"]), int(row["height"]),
                                  tuple(key) if isinstance(key, list) else key))
        return cls(doc["kind"], int(doc["source_bytes"]), members,
                   [(s["name"], s["reason"]) for s in doc["skipped"]])

    def write(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically (a reader never sees half a manifest)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))


def manifest_path(upload: str | os.PathLike) -> Path:
    """Where the manifest of a stored upload lives: next to it, ``<name>.manifest.json``."""
    upload = Path(upload)
    return upload.with_name(upload.name + MANIFEST_SUFFIX)


def upload_of_manifest(manifest: str | os.PathLike) -> Path | None:
    """The stored upload a manifest path belongs to (the inverse of :func:`manifest_path`), or
    None when the name does not end in ``.manifest.json``."""
    manifest = Path(manifest)
    if not manifest.name.endswith(MANIFEST_SUFFIX) or manifest.name == MANIFEST_SUFFIX:
        return None
    return manifest.with_name(manifest.name[: -len(MANIFEST_SUFFIX)])


# --------------------------------------------------------------------------------------------
# Opening: what kind of source, whole-archive rejections, compressed tars spooled
# --------------------------------------------------------------------------------------------
def open_source(path: str | os.PathLike, limits: Limits | None = None, *,
                cache_dir: str | os.PathLike | None = None) -> Source:
    """The folder or archive at ``path`` as a :class:`Source` (close it when done).

    A compressed tar is decompressed to a temporary file in ``cache_dir`` (default: the system
    temp dir), under the byte and ratio budgets of ``limits``. Raises :class:`ArchiveRejected`
    for a missing path, a file that is not a supported archive, a corrupt stream or a bomb.
    """
    limits = limits or Limits()
    spath = os.fspath(path)
    if os.path.isdir(spath):
        return FolderSource(spath)
    if not os.path.exists(spath):
        raise ArchiveRejected(spath, "does not exist", rule=Rejection.MISSING)
    if not os.path.isfile(spath):
        raise ArchiveRejected(spath, f"is not {SUPPORTED}", rule=Rejection.NOT_ARCHIVE)
    size = os.path.getsize(spath)
    if size == 0:
        raise ArchiveRejected(spath, f"is empty (0 bytes), not {SUPPORTED}", rule=Rejection.EMPTY)
    kind = sniff_kind(spath)
    if kind == "unknown":
        raise ArchiveRejected(spath, f"is not {SUPPORTED}", rule=Rejection.NOT_ARCHIVE)
    if kind == "zip":
        return ZipSource(spath)
    if kind == "tar":
        return TarSource(spath)

    def budget(total: int) -> None:
        _check_totals(spath, total, size, limits, counted=True)

    try:
        tmp = spool(spath, kind, cache_dir, budget)
    except ValueError as e:
        if isinstance(e, ArchiveRejected):
            raise
        raise ArchiveRejected(spath, f"corrupt archive: {e}", rule=Rejection.CORRUPT) from e
    return TarSource(tmp, original=spath, kind=f"tar.{kind}", owned=True)


def _check_totals(source: str, total: int, archive_bytes: int, limits: Limits, *, counted: bool) -> None:
    """Reject when ``total`` uncompressed bytes exceed the byte budget or the ratio budget."""
    what = "extracts to more than" if counted else "would extract to"
    if limits.max_total_bytes is not None and total > limits.max_total_bytes:
        raise ArchiveRejected(source, f"the archive {what} {_human(total)}, over the limit of "
                                      f"{_human(limits.max_total_bytes)} of uncompressed data",
                             rule=Rejection.TOO_LARGE)
    ratio = total / max(1, archive_bytes)
    if limits.max_ratio is not None and total > limits.ratio_floor and ratio > limits.max_ratio:
        raise ArchiveRejected(source, f"the archive expands {ratio:.0f} times ({_human(archive_bytes)} -> "
                                      f"{_human(total)}), more than the allowed ratio of {limits.max_ratio:.0f}: "
                                      f"it looks like an archive bomb", rule=Rejection.BOMB)


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------------
# Walking: every entry, whole-archive rules on the way
# --------------------------------------------------------------------------------------------
# A file entry that passed the structural rules: (name, key, size).
_Entry = tuple[str, Key, int]


def _safe_name(source: str, raw: str) -> str:
    """The normalised relative POSIX name of an archive member, or rejection if it would escape."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise ArchiveRejected(source, f"the archive member {raw!r} has a NUL character in its name", raw,
                              rule=Rejection.UNSAFE_NAME)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or _DRIVE.match(name) or ".." in parts:
        raise ArchiveRejected(
            source, f"the archive member {raw!r} has a path that would escape the archive (absolute, a drive "
                    f"letter or '..'): re-create the archive with relative paths inside it", raw,
            rule=Rejection.UNSAFE_NAME)
    return "/".join(parts)


def _walk_zip(source: str, zf: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in zf.infolist():
        name = _safe_name(source, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArchiveRejected(source, f"the archive member {info.filename!r} is a symbolic link; links are not "
                                          f"allowed: archive the image files themselves", info.filename,
                                  rule=Rejection.LINK)
        if info.is_dir() or not name:
            continue
        if mode and not (stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0):
            raise ArchiveRejected(source, f"the archive member {info.filename!r} is not a regular file", info.filename,
                                  rule=Rejection.SPECIAL)
        if info.flag_bits & 0x1:
            raise ArchiveRejected(source, f"the archive member {info.filename!r} is encrypted: use an archive "
                                          f"without a password", info.filename, rule=Rejection.ENCRYPTED)
        yield name, info.header_offset, info.file_size


def _walk_tar(source: str, tf: tarfile.TarFile) -> Iterator[_Entry]:
    for m in tf:
        name = _safe_name(source, m.name)
        if m.issym() or m.islnk():
            kind = "symbolic link" if m.issym() else "hard link"
            raise ArchiveRejected(source, f"the archive member {m.name!r} is a {kind}; links are not allowed: "
                                          f"archive the image files themselves", m.name, rule=Rejection.LINK)
        if m.isdir() or not name:
            continue
        if not m.isreg() or m.issparse():
            raise ArchiveRejected(source, f"the archive member {m.name!r} is not a regular file "
                                          f"(device, FIFO or sparse file)", m.name, rule=Rejection.SPECIAL)
        yield name, (m.offset_data, m.size), m.size


def _walk_folder(root: str, skipped: list[tuple[str, str]]) -> Iterator[_Entry]:
    def onerror(err: OSError) -> None:
        rel = os.path.relpath(err.filename, root).replace(os.sep, "/") if err.filename else "."
        skipped.append((rel, f"cannot read folder ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        keep = []
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
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
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError as e:
                skipped.append((rel, f"cannot read ({e.strerror or e})"))
                continue
            if stat.S_ISLNK(st.st_mode):
                skipped.append((rel, "symbolic link, not followed"))
            elif not stat.S_ISREG(st.st_mode):
                skipped.append((rel, "not a regular file"))
            else:
                yield rel, rel, st.st_size


def _entries(source: Source, skipped: list[tuple[str, str]]) -> list[_Entry]:
    """Every file entry of the source, in archive order; rejections raise on the way."""
    label = getattr(source, "original", source.path)
    if isinstance(source, FolderSource):
        return list(_walk_folder(source.path, skipped))
    if isinstance(source, ZipSource):
        try:
            with zipfile.ZipFile(source.path) as zf:
                return list(_walk_zip(label, zf))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
            if isinstance(e, ArchiveRejected):
                raise
            raise ArchiveRejected(label, f"corrupt zip archive: {e}", rule=Rejection.CORRUPT) from e
    try:
        with tarfile.open(source.path, "r:") as tf:
            return list(_walk_tar(label, tf))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if isinstance(e, ArchiveRejected):
            raise
        what = "tar archive" if source.kind == "tar" else f"{source.kind} archive (not a valid tar inside)"
        raise ArchiveRejected(label, f"corrupt {what}: {e}", rule=Rejection.CORRUPT) from e


# --------------------------------------------------------------------------------------------
# Members: the per-member rules, then the image headers
# --------------------------------------------------------------------------------------------
def _name_reason(name: str, limits: Limits) -> str | None:
    """Why a member is skipped for its name alone, or None."""
    parts = name.split("/")
    if "__MACOSX" in parts:
        return "macOS metadata (__MACOSX), not an image"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    try:
        encoded = [p.encode("utf-8") for p in parts]
    except UnicodeEncodeError:
        return "name is not valid UTF-8 text: rename the file"
    longest = max(len(p) for p in encoded)
    if longest > limits.max_name_bytes:
        return f"name too long ({longest} bytes in one part of the path, limit {limits.max_name_bytes})"
    if name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
        return "nested archive, not read (put all images in one archive)"
    return None


def _size_reason(size: int, limits: Limits) -> str | None:
    if size == 0:
        return "empty file"
    if limits.max_member_bytes is not None and size > limits.max_member_bytes:
        return f"file too large ({size / 2**20:.0f} MiB, limit {limits.max_member_bytes / 2**20:.0f} MiB)"
    return None


def _probe_member(source: Source, label: str, name: str, key: Key, size: int, limits: Limits) -> Member | str:
    """The member with its header's type and size, or the reason it is skipped; rejects an
    image over the per-image pixel budget."""
    try:
        with source.open(key) as fp:
            if archive_type(fp.read(_HEAD)):
                return "nested archive, not read (put all images in one archive)"
            fp.seek(0)
            header = probe(fp, name)
    except HeaderError as e:
        return str(e)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError,
            OSError) as e:
        return f"corrupt or unsupported archive member ({type(e).__name__}: {e})"
    if limits.max_image_pixels is not None and header.pixels > limits.max_image_pixels:
        raise ArchiveRejected(label, f"the image {name!r} is too large ({header.width} x {header.height} = "
                                     f"{header.pixels / _MB:.1f} megapixels, over the limit of "
                                     f"{limits.max_image_pixels / _MB:.1f} per image): shrink it or leave it out",
                              name, rule=Rejection.IMAGE_TOO_LARGE)
    return Member(name, size, header.type, header.width, header.height, key)


def build_manifest(source: Source, limits: Limits | None = None) -> Manifest:
    """Apply the rules (module docstring) to every member of ``source``; read image headers only.

    Raises :class:`ArchiveRejected` for the whole-archive rules; everything else is skipped.
    """
    limits = limits or Limits()
    label = getattr(source, "original", source.path)
    skipped: list[tuple[str, str]] = []
    entries = _entries(source, skipped)
    if limits.max_members is not None and len(entries) > limits.max_members:
        raise ArchiveRejected(label, f"the archive has more than {limits.max_members} files: split it",
                              rule=Rejection.TOO_MANY_FILES)
    archive_bytes = 0 if isinstance(source, FolderSource) else os.path.getsize(label)
    if not isinstance(source, FolderSource):
        _check_totals(label, sum(size for _, _, size in entries), archive_bytes, limits, counted=False)
    seen: set[str] = set()
    candidates: list[_Entry] = []
    for name, key, size in entries:
        reason = _name_reason(name, limits)
        if reason is None and name in seen:
            reason = "duplicate name in archive (first copy kept)"
        seen.add(name)
        reason = reason or _size_reason(size, limits)
        if reason is None:
            candidates.append((name, key, size))
        else:
            skipped.append((name, reason))
    members: list[Member] = []
    for name, key, size in sorted(candidates, key=lambda c: c[0]):
        found = _probe_member(source, label, name, key, size, limits)
        if isinstance(found, Member):
            members.append(found)
        else:
            skipped.append((name, found))
    manifest = Manifest(source.kind, archive_bytes, members, sorted(skipped, key=lambda s: s[0]))
    if limits.max_total_pixels is not None and manifest.total_pixels > limits.max_total_pixels:
        raise ArchiveRejected(label, f"the images hold {manifest.total_pixels / _MB:.1f} megapixels in total, over "
                                     f"the limit of {limits.max_total_pixels / _MB:.1f}: upload fewer or smaller "
                                     f"images",
                              rule=Rejection.TOO_MANY_PIXELS)
    return manifest


def inspect_archive(path: str | os.PathLike, limits: Limits | None = None, *,
                    cache_dir: str | os.PathLike | None = None,
                    keep_decompressed: str | os.PathLike | None = None) -> Manifest:
    """:func:`open_source` + :func:`build_manifest`, closing the source (and its spool file).

    ``keep_decompressed``: for a compressed tar, where to keep the decompressed tar the rules
    read (a path on the file system of ``cache_dir``, moved there rather than deleted); the
    manifest then describes that file (kind ``"tar"``), so a reader of the stored upload never
    decompresses it again. Other kinds leave it untouched.
    """
    source = open_source(path, limits, cache_dir=cache_dir)
    try:
        manifest = build_manifest(source, limits)
        if keep_decompressed is not None and isinstance(source, TarSource) and source.path != source.original:
            os.replace(source.path, keep_decompressed)  # the source's close() finds nothing left to delete
            manifest = dataclasses.replace(manifest, kind="tar", source_bytes=os.path.getsize(keep_decompressed))
        return manifest
    finally:
        source.close()
