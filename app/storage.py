"""Files on disk, all under the data dir (never inside the package).

Layout::

    <data_dir>/sp2ot.db                SQLite database (default database only)
    <data_dir>/tmp/proc-<uuid>/        uploads being received / checked by one API process
               upload-<uuid>/          (removed afterwards; an area whose process died, at start-up)
    <data_dir>/datasets/<id>/upload.zip                 a dataset's archive as uploaded (a compressed
    <data_dir>/datasets/<id>/upload.zip.manifest.json   tar: upload.tar, decompressed) and its manifest
    <data_dir>/jobs/<id>/upload.zip (+ .manifest.json)  the same for a job created from an archive
    <data_dir>/jobs/<id>/truth.csv     its ground-truth labels (optional)

Uploads stored before manifests existed are folders of extracted images (``.../images/``);
they are still read (scanned) as such.

Paths stored in the database are relative to the data dir, so the API and the workers may
mount it at different places.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from app.core.config import Settings


class Storage:
    def __init__(self, settings: Settings):
        self.root = settings.data_dir
        self.tmp = settings.tmp_dir

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

    @staticmethod
    def remove(path: Path) -> None:
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
