"""Files on disk, all under the data dir (never inside the package).

Layout::

    <data_dir>/sp2ot.db                SQLite database (default database only)
    <data_dir> tmp/upload-<uuid>/      uploads being received / checked (removed afterwards)
    <data_dir>/datasets/<id>/images/   extracted images of a dataset
    <data_dir>/jobs/<id>/images/       extracted images of a job created from an archive
    <data_dir>/jobs/<id>/truth.csv     its ground-truth labels (optional)

Paths stored in the database are relative to the data dir, so the API and the workers may
mount it at different places.
"""
from __future__ import annotations

import os
import shutil
import time
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
        """Remove upload leftovers of crashed processes. Returns how many were removed."""
        n = 0
        now = time.time()
        if not self.tmp.is_dir():
            return 0
        for entry in self.tmp.iterdir():
            try:
                if now - entry.stat().st_mtime > older_than:
                    self.remove(entry)
                    n += 1
            except OSError:
                pass
        return n
