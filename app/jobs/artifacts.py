"""What the worker makes once for the pages after a job's clustering: thumbnails and a 2-D map.

Both are files in the job's folder (``app.storage``), deleted with the job:

* ``thumbs.bin`` / ``thumbs.idx``: one small JPEG per image (longest side :data:`THUMB_SIZE`),
  concatenated in image order; ``thumbs.idx`` holds ``N + 1`` little-endian uint64 offsets, so
  thumbnail ``i`` is bytes ``idx[i]:idx[i + 1]`` (empty: the image could not be read). One file
  pair instead of 50,000 files; the pages read a thumbnail with two small reads and never decode
  an original.
* ``map.f32``: ``N x 2`` little-endian float32 in ``[0, 1]``, the features projected to 2-D
  (PCA to 50 dimensions, then t-SNE with openTSNE's FFT method; PCA alone when openTSNE is
  missing or there are too few images).

Thumbnails are made by a thread pool: Pillow releases the GIL while it decodes, resizes and
encodes, and a JPEG is decoded at a reduced scale (``draft``) when it is much larger than the
thumbnail.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("sp2ot.worker")

THUMB_SIZE = 128
THUMB_QUALITY = 75
THUMBS_BIN, THUMBS_IDX, MAP_FILE = "thumbs.bin", "thumbs.idx", "map.f32"
_CHUNK = 256
PCA_DIMS = 50
TSNE_MIN_IMAGES = 10

Progress = Callable[[str, float], None]  # (stage, percent)
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """``should_stop()`` answered True between two chunks."""


def thumbnail_bytes(path: str | os.PathLike, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of the image, its longest side ``size`` pixels at most; b"" when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is enough
            im = ImageOps.exif_transpose(im)
            im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            elif im.mode != "RGB":
                im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=THUMB_QUALITY)
            return buf.getvalue()
    except Exception:  # an unreadable image gets the placeholder, the job goes on
        log.debug("no thumbnail for %s", path, exc_info=True)
        return b""


def make_thumbnails(root: Path, filenames: Sequence[str], out_dir: Path, *, threads: int | None = None,
                    progress: Progress | None = None, should_stop: ShouldStop | None = None) -> int:
    """Write ``thumbs.bin`` and ``thumbs.idx`` for ``filenames`` (relative to ``root``), in that
    order. Returns how many images got a thumbnail."""
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(filenames) + 1, dtype="<u8")
    made = 0
    threads = threads or max(1, os.cpu_count() or 1)
    tmp_bin, tmp_idx = out_dir / (THUMBS_BIN + ".tmp"), out_dir / (THUMBS_IDX + ".tmp")
    with ThreadPoolExecutor(threads, thread_name_prefix="sp2ot-thumb") as pool, open(tmp_bin, "wb") as out:
        pos = 0
        for start in range(0, len(filenames), _CHUNK):
            if should_stop is not None and should_stop():
                raise Stopped()
            chunk = filenames[start:start + _CHUNK]
            for i, data in enumerate(pool.map(thumbnail_bytes, [root / f for f in chunk]), start):
                out.write(data)
                pos += len(data)
                offsets[i + 1] = pos
                made += bool(data)
            if progress is not None:
                progress("thumbnails", 100.0 * min(start + _CHUNK, len(filenames)) / max(1, len(filenames)))
    offsets.tofile(tmp_idx)
    os.replace(tmp_bin, out_dir / THUMBS_BIN)  # the index last: a reader never sees half a pair
    os.replace(tmp_idx, out_dir / THUMBS_IDX)
    return made


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
