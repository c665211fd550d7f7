"""Files on disk, all under the data dir (never inside the package).

Layout::

    <data_dir>/sp2ot.db                SQLite database (default database only)
    <data_dir>/tmp/proc-<uuid>/        uploads being received / checked by one API process
               upload-<uuid>/          (removed afterwards; an area whose process died, at start-up)
    <data_dir>/datasets/<id>/upload.zip                 a dataset's archive as uploaded (a compressed
    <data_dir>/datasets/<id>/upload.zip.manifest.json   tar: upload.tar, decompressed) and its manifest
    <data_dir>/jobs/<id>/upload.zip (+ .manifest.json)  the same for a job created from an archive
    <data_dir>/jobs/<id>/truth.csv     its ground-truth labels (optional)
    <data_dir>/jobs/<id>/thumbs.bin, thumbs.idx, map.f32   the pages' thumbnails and 2-D map
                                       (``app.jobs.artifacts``; every job, also one on a dataset)

Images are read from the stored upload through its manifest (:func:`open_stored`, the
engine's :class:`~sp2ot_engine.io.collection.ImageCollection`): the worker to cluster them, the
API to serve an original or put it in a zip export. Nothing is extracted. Uploads stored before
manifests existed are folders of extracted images (``.../images/``); their manifest is made
from the images' headers when they are read (:func:`stored_manifest`).

Paths stored in the database are relative to the data dir, so the API and the workers may
mount it at different places.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from sp2ot_engine.io.archive import Manifest, inspect_archive, manifest_path
from sp2ot_engine.io.collection import ImageCollection


class Storage:
    def __init__(self, settings: Settings):
        self.root = settings.data_dir
        self.tmp = settings.tmp_dir
        self.open_uploads = OpenUploads()

    def ensure(self) -> None:
        for d in (self.root, self.tmp, self.root / "datasets", self.root / "jobs"):
            d.mkdir(parents=True, exist_ok=True)

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def truth_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "truth.csv"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def abs(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if not str(p).startswith(str(self.root.resolve()) + os.sep):
            raise ValueError(f"path {rel!r} is outside the data dir")
        return p

    def remove(self, path: Path) -> None:
        self.open_uploads.forget(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def remove_job_files(self, job_id: str) -> None:
        self.remove(self.job_dir(job_id))

    def remove_dataset_files(self, dataset_id: str) -> None:
        self.remove(self.dataset_dir(dataset_id))

    def clean_stale_tmp(self, older_than: float = 24 * 3600) -> int:
        """Remove upload leftovers of processes that died: the upload area of every process
        that no longer holds its lock, and any other entry of ``tmp/`` older than ``older_than``
        seconds. Returns how many were removed."""
        n = 0
        now = time.time()
        if not self.tmp.is_dir():
            return 0
        for entry in self.tmp.iterdir():
            try:
                if entry.name.startswith(UploadArea.PREFIX) and entry.is_dir():
                    n += UploadArea.remove_if_abandoned(entry)
                elif now - entry.stat().st_mtime > older_than:
                    self.remove(entry)
                    n += 1
            except OSError:
                pass
        return n

    def open_upload_area(self) -> "UploadArea":
        """This process's folder for uploads being received (see :class:`UploadArea`)."""
        return UploadArea.create(self.tmp)


def stored_manifest(stored: Path) -> Manifest:
    """The manifest of a stored upload: the one written next to it when it was checked; for a
    folder of images stored before uploads had manifests, made by the archive rules from the
    images' headers (nothing decoded)."""
    manifest = manifest_path(stored)
    if manifest.is_file():
        return Manifest.read(manifest)
    return inspect_archive(stored)


def open_stored(stored: Path, **options) -> ImageCollection:
    """The images of a stored upload (``options``: those of
    :meth:`ImageCollection.from_manifest <sp2ot_engine.io.collection.ImageCollection.from_manifest>`,
    e.g. ``verify=True`` to decode each once). Close it after use."""
    return ImageCollection.from_manifest(stored, stored_manifest(stored), **options)


@dataclass
class _Opened:
    images: ImageCollection
    stamp: tuple[int, int]  # the manifest's (mtime_ns, size) when it was opened
    users: int = 0
    last_used: float = 0.0
    dropped: bool = False


class OpenUploads:
    """Stored uploads kept open between requests for single images (the pages' originals):
    opening one reads its manifest and, for a zip, the archive's central directory (~0.3 s for
    50,000 images), reading one image then takes a millisecond. At most ``size`` are kept, the
    least recently used dropped first; one is also dropped when its manifest changed, when
    :meth:`Storage.remove` removes its folder, and after ``idle`` seconds unused (a timer
    thread), so a deleted upload's file is not held open for long. A dropped collection is
    closed once its last user is done. Uploads without a manifest (stored before manifests
    existed) are opened for each use."""

    def __init__(self, size: int = 2, idle: float = 60.0):
        self.size = size
        self.idle = idle
        self._open: OrderedDict[Path, _Opened] = OrderedDict()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    @contextmanager
    def use(self, stored: Path) -> Iterator[ImageCollection]:
        """The images of the stored upload ``stored`` (raises as :func:`open_stored`)."""
        try:
            st = manifest_path(stored).stat()
        except FileNotFoundError:
            with open_stored(stored) as images:
                yield images
            return
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            entry = self._open.get(stored)
            if entry is not None and entry.stamp != stamp:
                self._drop(stored)
                entry = None
            if entry is None:
                entry = _Opened(open_stored(stored), stamp)
                self._open[stored] = entry
                while len(self._open) > self.size:
                    self._drop(next(iter(self._open)))
            self._open.move_to_end(stored)
            entry.users += 1
        try:
            yield entry.images
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.monotonic()
                if entry.dropped and entry.users == 0:
                    entry.images.close()
                self._arm()

    def forget(self, folder: Path) -> None:
        """Drop the uploads stored under ``folder`` (it is being removed)."""
        with self._lock:
            for stored in [p for p in self._open if p == folder or folder in p.parents]:
                self._drop(stored)

    def close(self) -> None:
        with self._lock:
            for stored in list(self._open):
                self._drop(stored)

    def _drop(self, stored: Path) -> None:  # under the lock
        entry = self._open.pop(stored)
        entry.dropped = True
        if entry.users == 0:
            entry.images.close()

    def _arm(self) -> None:  # under the lock: the idle sweep runs while something is open
        if self._open and self._timer is None:
            self._timer = threading.Timer(self.idle, self._sweep)
            self._timer.daemon = True
            self._timer.start()

    def _sweep(self) -> None:
        with self._lock:
            self._timer = None
            now = time.monotonic()
            for stored, entry in list(self._open.items()):
                if entry.users == 0 and now - entry.last_used >= self.idle:
                    self._drop(stored)
            self._arm()


class UploadArea:
    """``tmp/proc-<uuid>/``: the folder where one API process receives uploads. The process
    holds an exclusive ``flock`` on the folder while it lives, so the kernel releases it when
    the process dies however it dies; a starting process removes every area whose lock it can
    take (its uploads died with their process). Where ``flock`` is not available, the lock is
    not taken and such an area goes after the age limit only."""

    PREFIX = "proc-"

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, tmp: Path) -> "UploadArea":
        path = tmp / f"{cls.PREFIX}{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return cls(path, _lock(path, wait=True))

    @staticmethod
    def remove_if_abandoned(path: Path) -> int:
        """Remove the area when no process holds its lock. Returns 1 if removed."""
        fd = _lock(path, wait=False)
        if fd is None:
            return 0
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        return 1

    def close(self) -> None:
        """Remove the area and release it (at a clean shutdown)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None when another
    process holds it (or flock is not available here)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return fd
    except OSError:
        os.close(fd)
        return None
