"""Upload validation: safe extraction of an uploaded archive, then an image scan.

Policy (every rejection is a 422 whose message says what to fix, except 413/507):

* formats: zip, tar, tar.gz/tgz, tar.bz2, tar.xz (detected from the content, not the name);
* a member whose name is absolute (``/x``, ``C:x``) or contains ``..`` rejects the archive;
* symbolic links, hard links and special files (devices, FIFOs) reject the archive;
* encrypted zip members reject the archive;
* more than ``max_archive_files`` files rejects the archive;
* archive bombs: the extracted size is counted byte by byte while extracting (declared sizes
  are checked first but never trusted); above ``max_uncompressed_bytes``, or above
  ``max_compression_ratio`` times the archive size once past ``compression_ratio_floor``
  bytes, the archive is rejected;
* nested archives (``.zip``, ``.tar``, ``.tgz``, ``.gz``, ``.7z``, ...) are NOT extracted:
  they are skipped and reported in ``skipped`` with the reason;
* duplicate names keep the first copy (reported); a member that cannot be written (a name
  too long, a file/folder name clash, a corrupt compressed member) is skipped and reported;
* then :func:`sp2ot_engine.io.collection.scan_images` verifies every file decodes; non-images,
  hidden files, ``__MACOSX`` metadata and corrupt images are skipped and reported; no
  image at all rejects the upload.

On any rejection the destination folder is removed: nothing is left behind.
"""
from __future__ import annotations

import csv
import errno
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from app.core.config import Settings
from app.errors import ApiError, UploadRejected, human_bytes

NESTED_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".tgz", ".tar.gz", ".gz", ".tbz", ".tbz2", ".tar.bz2", ".bz2", ".txz",
    ".tar.xz", ".xz", ".7z", ".rar", ".zst", ".tar.zst", ".lz", ".lzma", ".z", ".cab", ".jar",
)
SUPPORTED = "zip, tar, tar.gz (tgz), tar.bz2 or tar.xz"
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
_DISK_RESERVE = 256 * 1024 * 1024


class InsufficientStorage(ApiError):
    status_code = 507


@dataclass
class Limits:
    max_files: int
    max_uncompressed: int
    max_ratio: float
    ratio_floor: int

    @classmethod
    def from_settings(cls, s: Settings) -> "Limits":
        return cls(s.max_archive_files, s.max_uncompressed_bytes, s.max_compression_ratio, s.compression_ratio_floor)


@dataclass
class Extracted:
    root: Path
    kind: str
    archive_bytes: int
    uncompressed_bytes: int = 0
    n_files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PreparedImages:
    """An extracted, scanned upload ready to be clustered."""

    root: Path
    names: list[str]
    skipped: list[tuple[str, str]]
    archive_bytes: int
    uncompressed_bytes: int

    @property
    def n_images(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------------------------------------
def detect_kind(path: Path) -> str | None:
    """'zip', 'tar' (any compression) or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"  # self-extracting zip with a prefix
    try:
        if len(head) >= 512 and tarfile.is_tarfile(path):
            return "tar"  # v7 tar without the ustar magic
    except Exception:
        pass
    return None


def safe_name(raw: str) -> str:
    """Normalised relative POSIX name; raises UploadRejected for names escaping the archive."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise UploadRejected(f"The archive member {raw!r} has a NUL character in its name. Rename it and re-create the archive.")
    if name.startswith("/") or _DRIVE.match(name):
        raise UploadRejected(
            f"The archive member {raw!r} has an absolute path, which would escape the archive. "
            "Re-create the archive with relative paths (e.g. `cd images && zip -r ../images.zip .`)."
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UploadRejected(
            f"The archive member {raw!r} contains '..', which would escape the archive. "
            "Re-create the archive with paths inside it only."
        )
    return "/".join(parts)


def _is_nested_archive(name: str) -> bool:
    low = name.lower()
    return low.endswith(NESTED_ARCHIVE_SUFFIXES)


class _Budget:
    """Counts extracted bytes against the limits while extracting."""

    def __init__(self, limits: Limits, archive_bytes: int, dest: Path):
        self.limits = limits
        self.archive_bytes = max(1, archive_bytes)
        self.dest = dest
        self.total = 0
        self.files = 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise UploadRejected(
                f"The archive has more than {self.limits.max_files} files (limit SP2OT_MAX_ARCHIVE_FILES). "
                "Split it into several uploads."
            )

    def check_declared(self, declared_total: int) -> None:
        self._check(declared_total, declared=True)

    def add_bytes(self, n: int) -> None:
        self.total += n
        self._check(self.total, declared=False)

    def _check(self, total: int, declared: bool) -> None:
        lim = self.limits
        what = "would extract to" if declared else "extracts to more than"
        if total > lim.max_uncompressed:
            raise UploadRejected(
                f"The archive {what} {human_bytes(total)}, over the limit of {human_bytes(lim.max_uncompressed)} "
                "of uncompressed data (SP2OT_MAX_UNCOMPRESSED_BYTES). Upload fewer or smaller images."
            )
        ratio = total / self.archive_bytes
        if total > lim.ratio_floor and ratio > lim.max_ratio:
            raise UploadRejected(
                f"The archive expands {ratio:.0f} times ({human_bytes(self.archive_bytes)} -> {human_bytes(total)}), "
                f"more than the allowed ratio of {lim.max_ratio:.0f} (SP2OT_MAX_COMPRESSION_RATIO): "
                "it looks like an archive bomb. Upload the images in an ordinary archive."
            )

    def check_disk(self, need: int) -> None:
        if shutil.disk_usage(self.dest).free - need < _DISK_RESERVE:
            raise self.out_of_space()

    def out_of_space(self) -> "InsufficientStorage":
        free = shutil.disk_usage(self.dest).free
        return InsufficientStorage(
            f"The server has not enough free disk space to store this upload ({human_bytes(free)} free). "
            "Try again later or ask the administrator to free space."
        )


def _open_new(path: Path):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


class _MemberUnwritable(Exception):
    """A member that cannot be stored under its name (skipped and reported)."""


def _copy_member(src, target: Path, budget: _Budget) -> None:
    try:
        out = _open_new(target)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise budget.out_of_space() from e
        raise _MemberUnwritable(f"cannot be stored under this name ({e.strerror or e})") from e
    with out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            budget.add_bytes(len(chunk))
            try:
                out.write(chunk)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise budget.out_of_space() from e
                raise


def _target_for(root: Path, name: str, seen: set[str], skipped: list) -> Path | None:
    if name in seen:
        skipped.append((name, "duplicate name in archive (first copy kept)"))
        return None
    target = root.joinpath(*name.split("/"))
    # Defence in depth: safe_name already refused anything that could leave root.
    if not str(target.resolve()).startswith(str(root.resolve()) + os.sep):
        raise UploadRejected(f"The archive member {name!r} would be extracted outside the archive folder.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        skipped.append((name, "name clashes with a file of the same name in the archive"))
        return None
    except OSError as e:
        skipped.append((name, f"cannot be stored ({e.strerror or e})"))
        return None
    if target.exists():
        skipped.append((name, "name clashes with a folder of the same name in the archive"))
        return None
    seen.add(name)
    return target


def _extract_zip(src: Path, root: Path, budget: _Budget, out: Extracted) -> None:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UploadRejected(f"The zip archive is corrupt ({e}). Re-create it and upload it again.") from e
    with zf:
        infos = zf.infolist()
        files = []
        declared = 0
        for info in infos:
            name = safe_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UploadRejected(
                    f"The archive member {info.filename!r} is a symbolic link; links are not allowed. "
                    "Archive the image files themselves (e.g. `zip -r` without -y)."
                )
            if info.is_dir() or not name:
                continue
            if mode and not (stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0):
                raise UploadRejected(f"The archive member {info.filename!r} is not a regular file. Remove it.")
            if info.flag_bits & 0x1:
                raise UploadRejected(
                    f"The archive member {info.filename!r} is encrypted. Upload an archive without a password."
                )
            budget.add_file()
            declared += info.file_size
            files.append((name, info))
        budget.check_declared(declared)
        budget.check_disk(declared)
        seen: set[str] = set()
        for name, info in files:
            if _is_nested_archive(name):
                out.skipped.append((name, "nested archive, not extracted (put all images in one archive)"))
                continue
            target = _target_for(root, name, seen, out.skipped)
            if target is None:
                continue
            try:
                with zf.open(info) as member:
                    _copy_member(member, target, budget)
            except ApiError:
                raise
            except _MemberUnwritable as e:
                out.skipped.append((name, str(e)))
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
                target.unlink(missing_ok=True)
                out.skipped.append((name, f"corrupt or unsupported archive member ({e})"))


def _extract_tar(src: Path, root: Path, budget: _Budget, out: Extracted) -> None:
    seen: set[str] = set()
    try:
        with open(src, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for m in tf:
                name = safe_name(m.name)
                if m.issym() or m.islnk():
                    kind = "symbolic link" if m.issym() else "hard link"
                    raise UploadRejected(
                        f"The archive member {m.name!r} is a {kind}; links are not allowed. "
                        "Archive the image files themselves (e.g. `tar --dereference`)."
                    )
                if m.isdir() or not name:
                    continue
                if not m.isreg() or m.issparse():
                    raise UploadRejected(
                        f"The archive member {m.name!r} is not a regular file (device, FIFO or sparse file). Remove it."
                    )
                budget.add_file()
                # Tar sizes are exact: refuse before writing a file that cannot fit.
                budget.check_declared(budget.total + m.size)
                if _is_nested_archive(name):
                    out.skipped.append((name, "nested archive, not extracted (put all images in one archive)"))
                    continue
                target = _target_for(root, name, seen, out.skipped)
                if target is None:
                    continue
                budget.check_disk(m.size)
                member = tf.extractfile(m)
                if member is None:  # pragma: no cover - regular files always have data
                    continue
                try:
                    _copy_member(member, target, budget)
                except _MemberUnwritable as e:
                    out.skipped.append((name, str(e)))
    except ApiError:
        raise
    except tarfile.ReadError as e:
        if budget.files == 0:
            raise UploadRejected(
                f"The file is not a valid {SUPPORTED} archive ({e}). Upload the images in one of these formats."
            ) from e
        raise _corrupt(budget, e) from e
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as e:
        raise _corrupt(budget, e) from e


def _corrupt(budget: _Budget, e: BaseException) -> UploadRejected:
    return UploadRejected(
        f"The archive is corrupt or truncated after {budget.files} file(s) ({e}). "
        "Re-create it and upload it again."
    )


def extract_archive(src: Path, dest: Path, limits: Limits) -> Extracted:
    """Extract ``src`` into the new folder ``dest`` (removed again if anything is rejected)."""
    archive_bytes = src.stat().st_size
    if archive_bytes == 0:
        raise UploadRejected("The uploaded archive is empty (0 bytes). Upload a zip or tar archive of images.")
    kind = detect_kind(src)
    if kind is None:
        raise UploadRejected(
            f"The uploaded file is not an archive: upload the images as one {SUPPORTED} file "
            "(e.g. `zip -r images.zip my_images/`)."
        )
    dest.mkdir(parents=True, exist_ok=False)
    out = Extracted(root=dest, kind=kind, archive_bytes=archive_bytes)
    budget = _Budget(limits, archive_bytes, dest)
    try:
        if kind == "zip":
            _extract_zip(src, dest, budget, out)
        else:
            _extract_tar(src, dest, budget, out)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    out.uncompressed_bytes = budget.total
    out.n_files = budget.files
    if budget.files == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise UploadRejected("The archive is empty: it contains no file. Put the images in it and upload it again.")
    return out


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image names (relative POSIX paths, sorted) and skipped files of a folder."""
    from sp2ot_engine.io.collection import scan_images

    collection = scan_images(root, threads=2)
    try:
        return list(collection.names), [(str(n), str(r)) for n, r in collection.skipped]
    finally:
        collection.close()


def _no_image_message(skipped: list[tuple[str, str]], n_files: int) -> str:
    examples = "; ".join(f"{n}: {r}" for n, r in skipped[:5])
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    return (
        f"The archive contains no readable image ({n_files} file(s) checked"
        + (f": {examples}{more}" if examples else "")
        + "). Upload JPEG, PNG, GIF, BMP, TIFF or WebP images."
    )


def prepare_upload(archive: Path, dest: Path, settings: Settings) -> PreparedImages:
    """Validate and extract an uploaded archive into ``dest``, then scan its images.

    Raises :class:`UploadRejected` (422), :class:`InsufficientStorage` (507); ``dest`` does
    not exist afterwards in that case.
    """
    extracted = extract_archive(archive, dest, Limits.from_settings(settings))
    try:
        names, skipped = scan_folder(dest)
        skipped = sorted(extracted.skipped + skipped)
        if not names:
            raise UploadRejected(_no_image_message(skipped, extracted.n_files))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return PreparedImages(dest, names, skipped, extracted.archive_bytes, extracted.uncompressed_bytes)


# ---------------------------------------------------------------------------------------------
# Ground-truth CSV
# ---------------------------------------------------------------------------------------------
_HEADER_NAMES = {"filename", "file", "name", "path", "image", "filepath", "file_name"}


def parse_truth(path: Path, image_names: list[str]) -> list[tuple[str, str]]:
    """``filename,label`` rows (header optional) matched to the image names.

    A filename matches an image by its path inside the archive or, when unambiguous, by its
    base name. Returns ``(image name, label)`` pairs; raises UploadRejected when the file is
    malformed or matches no image.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UploadRejected("The truth file is not UTF-8 text. Save it as a UTF-8 CSV with lines `filename,label`.")
    if not text.strip():
        raise UploadRejected("The truth file is empty. Send a CSV with lines `filename,label`.")
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(io.StringIO(text), dialect))
    by_path = set(image_names)
    by_base: dict[str, str | None] = {}
    for n in image_names:
        b = n.rsplit("/", 1)[-1]
        by_base[b] = None if b in by_base else n  # None = ambiguous
    out: dict[str, str] = {}
    unmatched: list[str] = []
    for lineno, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise UploadRejected(
                f"Truth CSV line {lineno} has {len(row)} column(s); each line must be `filename,label`."
            )
        fname, label = row[0].strip(), row[1].strip()
        if lineno == 1 and fname.lower() in _HEADER_NAMES:
            continue
        if not fname or not label:
            raise UploadRejected(f"Truth CSV line {lineno} has an empty filename or label.")
        key = fname.replace("\\", "/")
        while key.startswith("./"):
            key = key[2:]
        if key in by_path:
            match: str | None = key
        elif "/" not in key:
            match = by_base.get(key)
        else:
            match = None
        if match is None:
            unmatched.append(fname)
            continue
        if match in out and out[match] != label:
            raise UploadRejected(f"Truth CSV gives two labels for {fname!r} ({out[match]!r} and {label!r}).")
        out[match] = label
    if not out:
        example = f" (e.g. {unmatched[0]!r})" if unmatched else ""
        raise UploadRejected(
            f"No filename of the truth CSV matches an image of the archive{example}. "
            f"Use the paths inside the archive, e.g. {image_names[0]!r}."
        )
    return sorted(out.items())


def write_truth(rows: list[tuple[str, str]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(rows)


def read_truth(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        next(r, None)
        return {row[0]: row[1] for row in r if len(row) == 2}
