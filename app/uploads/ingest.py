"""An uploaded archive checked once and stored as it came (nothing decoded, no torch).

The rules are :mod:`sp2ot_engine.io.archive`'s and only theirs (its table: one rule per kind
of bad member): names, sizes, the compression ratio, types by magic bytes, pixel counts from
the image headers, under the budgets of the settings (:func:`archive_limits`). An archive that
breaks a whole-archive rule, or holds no image, is refused with a 422 whose message says what
to fix and, for a limit, which setting sets it (:func:`rejection_message`); a full disk is a
507. An accepted archive is stored in the job's or dataset's folder as it came (a compressed
tar as the decompressed tar the check wrote anyway), with its manifest next to it
(``upload.zip`` and ``upload.zip.manifest.json``): the worker reads the images through the
manifest without scanning again. A truth CSV is read by :mod:`sp2ot_engine.io.labels_csv` and
matched to the manifest's image names.

The caller removes the folders it made when something fails: nothing is left behind.
"""
from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from app.errors import ApiError, UploadRejected, human_bytes
from app.storage import stored_manifest
from sp2ot_engine.io.archive import ArchiveRejected, Limits, Manifest, Rejection, inspect_archive, manifest_path
from sp2ot_engine.io.labels_csv import CsvFormatError, match_truth, read_truth

SUPPORTED = "zip, tar, tar.gz (tgz), tar.bz2 or tar.xz"
STORED_NAME = "upload"  # <folder>/upload.zip or upload.tar, its manifest next to it
SKIPPED_SHOWN = 5
#: The setting behind each limit a rejection can break.
LIMIT_SETTINGS = {
    Rejection.TOO_MANY_FILES: "SP2OT_MAX_ARCHIVE_FILES",
    Rejection.TOO_LARGE: "SP2OT_MAX_UNCOMPRESSED_BYTES",
    Rejection.BOMB: "SP2OT_MAX_COMPRESSION_RATIO",
    Rejection.IMAGE_TOO_LARGE: "SP2OT_MAX_IMAGE_PIXELS",
    Rejection.TOO_MANY_PIXELS: "SP2OT_MAX_UPLOAD_PIXELS",
}


class InsufficientStorage(ApiError):
    status_code = 507


@dataclass
class CheckedUpload:
    """An archive that passed the rules: the file to store (the upload itself, or the
    decompressed tar of a compressed one), its manifest, and the upload's size in bytes."""

    path: Path
    manifest: Manifest
    archive_bytes: int

    @property
    def names(self) -> list[str]:
        return self.manifest.names

    @property
    def n_images(self) -> int:
        return len(self.manifest.members)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.manifest.skipped

    @property
    def uncompressed_bytes(self) -> int:
        """The images' total size, uncompressed."""
        return self.manifest.total_bytes


def archive_limits(settings: Settings) -> Limits:
    """The archive rules' budgets (see :class:`sp2ot_engine.io.archive.Limits`) from the settings."""
    return Limits(max_members=settings.max_archive_files, max_total_bytes=settings.max_uncompressed_bytes,
                  max_ratio=settings.max_compression_ratio, ratio_floor=settings.compression_ratio_floor,
                  max_image_pixels=settings.max_image_pixels, max_total_pixels=settings.max_upload_pixels)


def rejection_message(e: ArchiveRejected) -> str:
    """A client's message for a refused upload: what is wrong, what to do, the setting of a limit."""
    if e.rule in (Rejection.MISSING, Rejection.NOT_ARCHIVE):
        return (f"The uploaded file is not an archive: upload the images as one {SUPPORTED} file "
                "(e.g. `zip -r images.zip my_images/`).")
    if e.rule == Rejection.EMPTY:
        return "The uploaded archive is empty (0 bytes). Upload a zip or tar archive of images."
    if e.rule == Rejection.CORRUPT:
        return f"The archive cannot be read ({e.reason}). Re-create it and upload it again."
    setting = LIMIT_SETTINGS.get(e.rule)
    return _sentence(e.reason) + (f" (limit: {setting})." if setting else ".")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def out_of_space(folder: Path) -> InsufficientStorage:
    return InsufficientStorage(
        f"The server has not enough free disk space to store this upload ({human_bytes(shutil.disk_usage(folder).free)}"
        " free). Try again later or ask the administrator to free space."
    )


def _no_image_message(manifest: Manifest) -> str:
    if not manifest.skipped:
        return "The archive is empty: it contains no file. Put the images in it and upload it again."
    examples = "; ".join(f"{n}: {r}" for n, r in manifest.skipped[:SKIPPED_SHOWN])
    more = f" (and {len(manifest.skipped) - SKIPPED_SHOWN} more)" if len(manifest.skipped) > SKIPPED_SHOWN else ""
    return (f"The archive contains no readable image ({len(manifest.skipped)} file(s) checked: {examples}{more}). "
            "Upload JPEG, PNG, GIF, BMP, TIFF or WebP images.")


def check_upload(archive: Path, settings: Settings) -> CheckedUpload:
    """Apply the archive rules to the received file ``archive``; a compressed tar is
    decompressed next to it. Raises :class:`UploadRejected` (422) or
    :class:`InsufficientStorage` (507)."""
    plain = archive.with_name(archive.name + ".tar")
    try:
        manifest = inspect_archive(archive, archive_limits(settings), cache_dir=archive.parent,
                                   keep_decompressed=plain)
    except ArchiveRejected as e:
        raise UploadRejected(rejection_message(e)) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise out_of_space(archive.parent) from e
        raise
    if not manifest.members:
        plain.unlink(missing_ok=True)
        raise UploadRejected(_no_image_message(manifest))
    return CheckedUpload(plain if plain.exists() else archive, manifest, archive.stat().st_size)


def store_upload(checked: CheckedUpload, folder: Path) -> Path:
    """Move the checked upload into ``folder`` (made if needed) as ``upload.<kind>`` and write
    its manifest next to it. Returns the stored file."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{STORED_NAME}.{checked.manifest.kind}"
    checked.path.replace(target)
    try:
        checked.manifest.write(manifest_path(target))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise out_of_space(folder) from e
        raise
    return target


def image_names(stored: Path) -> list[str]:
    """The image names of a stored upload (see :func:`app.storage.stored_manifest`)."""
    return stored_manifest(stored).names


def read_upload_truth(path: Path, filename: str | None, names: list[str]) -> list[tuple[str, str]]:
    """The truth CSV at ``path`` (sent as ``filename``) as ``(image name, label)`` pairs of the
    images ``names`` it matches, sorted; rows naming no image are left out. Raises
    :class:`UploadRejected` when the file cannot be read or matches no image."""
    try:
        truth = read_truth(path, name=repr(filename) if filename else "in the form field 'truth'")
        matched, unmatched = match_truth(truth, names)
    except CsvFormatError as e:
        raise UploadRejected(f"{_sentence(str(e))}. Send a CSV of lines `filename,label`.") from None
    if not matched:
        example = f" (e.g. {unmatched[0]!r})" if unmatched else ""
        raise UploadRejected(
            f"No filename of the truth CSV matches an image of the archive{example}. "
            f"Use the paths inside the archive, e.g. {names[0]!r}."
        )
    return sorted(matched.items())
