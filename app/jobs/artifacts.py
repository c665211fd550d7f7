"""What the worker makes once after a job's clustering: thumbnails and a 2-D map for the
pages, and the fitted model for assigning new images.

All are files in the job's folder (``app.storage``), deleted with the job:

* ``thumbs.bin`` / ``thumbs.idx``: one small JPEG per image (longest side :data:`THUMB_SIZE`),
  concatenated in image order; ``thumbs.idx`` holds ``N + 1`` little-endian uint64 offsets, so
  thumbnail ``i`` is bytes ``idx[i]:idx[i + 1]`` (empty: no thumbnail could be made). One file
  pair instead of 50,000 files; the pages read a thumbnail with two small reads and never decode
  an original.
* ``map.f32``: ``N x 2`` little-endian float32 in ``[0, 1]``, the features projected to 2-D
  (PCA to 50 dimensions, then t-SNE with openTSNE's FFT method; PCA alone when openTSNE is
  missing or there are too few images).
* ``model.pt``: the fitted estimator (``SP2OTClustering.save``: its parameters, i.e. backbone
  name and input size, and the head's ``K x d`` prototypes; in full mode the fine-tuned backbone
  too), what ``POST /jobs/{id}/assign`` predicts new images with (:func:`save_model`). Written
  only by an estimator that can ``save``.

Thumbnails cost no decoding of their own: :class:`Thumbnails` is the ``on_decoded`` hook of the
engine's verification pass (``ImageCollection.from_manifest(..., verify=True, on_decoded=...)``),
which decodes every image of the upload once anyway; it shrinks each decoded image (JPEGs come
decoded at a reduced scale no smaller than :data:`THUMB_SIZE`) and encodes a small JPEG, in the
verifying threads, then :meth:`Thumbnails.write` lays them out in the job's image order.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("sp2ot.worker")

THUMB_SIZE = 128
THUMB_QUALITY = 75
THUMBS_BIN, THUMBS_IDX, MAP_FILE, MODEL_FILE = "thumbs.bin", "thumbs.idx", "map.f32", "model.pt"
_CHUNK = 256
PCA_DIMS = 50
TSNE_MIN_IMAGES = 10

Progress = Callable[[str, float], None]  # (stage, percent)
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """``should_stop()`` answered True between two chunks."""


def thumbnail_of(image, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of a decoded RGB image (as the engine makes it: EXIF orientation applied,
    transparency flattened), its longest side ``size`` pixels at most (never enlarged); b"" when
    it cannot be made. The image itself is left as it is."""
    from PIL import Image

    try:
        w, h = image.size
        scale = min(1.0, size / max(w, h, 1))
        small = image if scale == 1.0 else image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                        Image.Resampling.BILINEAR, reducing_gap=2.0)
        if small.mode != "RGB":
            small = small.convert("RGB")
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=THUMB_QUALITY)
        return buf.getvalue()
    except Exception:  # a missing thumbnail is a placeholder on the pages; the job goes on
        log.debug("cannot make a thumbnail", exc_info=True)
        return b""


class Thumbnails:
    """Collects a thumbnail of every image the engine decodes: pass it as ``on_decoded`` (it
    is called as ``thumbs(name, image)`` from several threads, in any order). Thumbnails are
    spooled to an anonymous temporary file in the job's folder as they come (gone with the
    process, however it ends; two attempts of a job never share one); :meth:`write` then makes
    ``thumbs.bin`` / ``thumbs.idx`` in the job's image order."""

    #: Read by the engine: JPEGs are decoded at a reduced scale, but no smaller than this.
    decode_min_side = THUMB_SIZE

    def __init__(self, out_dir: Path, size: int = THUMB_SIZE):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.size = size
        self._spool = tempfile.TemporaryFile(dir=out_dir, prefix=THUMBS_BIN + ".")
        self._where: dict[str, tuple[int, int]] = {}  # name -> (offset, length) in the spool
        self._end = 0
        self._lock = threading.Lock()

    def __call__(self, name: str, image) -> None:
        data = thumbnail_of(image, self.size)
        with self._lock:
            self._spool.write(data)
            self._where[name] = (self._end, len(data))
            self._end += len(data)

    def __len__(self) -> int:
        return sum(1 for _, n in self._where.values() if n)

    def write(self, names: Sequence[str], *, progress: Progress | None = None,
              should_stop: ShouldStop | None = None) -> int:
        """Write ``thumbs.bin`` and ``thumbs.idx`` for ``names``, in that order (a name without a
        thumbnail gets an empty entry). Returns how many images got a thumbnail."""
        with self._lock:
            self._spool.flush()
        offsets = np.zeros(len(names) + 1, dtype="<u8")
        made = pos = 0
        unique = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # another attempt may write at the same time
        tmp_bin, tmp_idx = self.out_dir / (THUMBS_BIN + unique), self.out_dir / (THUMBS_IDX + unique)
        fd = self._spool.fileno()
        try:
            with open(tmp_bin, "wb") as out:
                for start in range(0, len(names), _CHUNK):
                    if should_stop is not None and should_stop():
                        raise Stopped()
                    for i in range(start, min(start + _CHUNK, len(names))):
                        at, n = self._where.get(names[i], (0, 0))
                        if n:
                            out.write(os.pread(fd, n, at))
                            pos += n
                            made += 1
                        offsets[i + 1] = pos
                    if progress is not None:
                        progress("thumbnails", 100.0 * min(start + _CHUNK, len(names)) / max(1, len(names)))
            offsets.tofile(tmp_idx)
            os.replace(tmp_bin, self.out_dir / THUMBS_BIN)  # the index last: a reader never sees half a pair
            os.replace(tmp_idx, self.out_dir / THUMBS_IDX)
        finally:
            tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
        return made

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> "Thumbnails":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_thumbnail(job_dir: Path, idx: int) -> bytes | None:
    """Thumbnail ``idx`` of a job (b"" for an unreadable image), None when the job has none."""
    try:
        with open(job_dir / THUMBS_IDX, "rb") as f:
            f.seek(8 * idx)
            raw = f.read(16)
        if idx < 0 or len(raw) < 16:
            return None
        start, end = np.frombuffer(raw, dtype="<u8")
        if end <= start:
            return b""
        with open(job_dir / THUMBS_BIN, "rb") as f:
            f.seek(int(start))
            return f.read(int(end - start))
    except FileNotFoundError:
        return None


def project_2d(features, seed: int = 0, threads: int | None = None) -> tuple[np.ndarray, str]:
    """``N x 2`` float32 coordinates in ``[0, 1]`` and the method used (``"tsne"`` or ``"pca"``)."""
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    x = x - x.mean(axis=0, keepdims=True)
    dims = min(PCA_DIMS, x.shape[1], n)
    if dims < x.shape[1]:
        from sklearn.decomposition import PCA

        x = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit_transform(x).astype(np.float32)
    method = "pca"
    coords = None
    if n >= TSNE_MIN_IMAGES:
        try:
            from openTSNE import TSNE
        except ImportError:
            log.info("openTSNE is not installed: the map is a PCA projection")
        else:
            perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
            tsne = TSNE(n_components=2, perplexity=perplexity, n_iter=400, initialization="pca",
                        n_jobs=threads or max(1, os.cpu_count() or 1), random_state=seed, verbose=False)
            coords = np.asarray(tsne.fit(x), dtype=np.float32)
            method = "tsne"
    if coords is None:
        coords = _pca2(x)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    return ((coords - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32), method


def _pca2(x: np.ndarray) -> np.ndarray:
    if x.shape[1] >= 2 and x.shape[0] >= 2:
        _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
        return (x @ vt[:2].T).astype(np.float32)
    return np.zeros((x.shape[0], 2), dtype=np.float32)


def write_map(coords: np.ndarray, out_dir: Path) -> None:
    tmp = out_dir / (MAP_FILE + ".tmp")
    np.asarray(coords, dtype="<f4").tofile(tmp)
    os.replace(tmp, out_dir / MAP_FILE)


def read_map(job_dir: Path) -> bytes | None:
    try:
        return (job_dir / MAP_FILE).read_bytes()
    except FileNotFoundError:
        return None


def save_model(est, out_dir: Path) -> int | None:
    """Save the fitted estimator as ``model.pt`` in ``out_dir`` (atomically: another attempt may
    write at the same time). Returns its size in bytes, or None when the estimator cannot save."""
    if not callable(getattr(est, "save", None)):
        return None
    tmp = out_dir / f"{MODEL_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        est.save(tmp)
        os.replace(tmp, out_dir / MODEL_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return (out_dir / MODEL_FILE).stat().st_size
