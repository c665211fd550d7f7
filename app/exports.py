"""Exports of a succeeded job's (possibly curated) clusters, each a stream of bytes:

* ``csv``: as ``labels.csv`` (``filename,cluster,confidence,outlier_score,outlier,duplicate_of``,
  and ``cluster_name`` once curated; written by the engine's :mod:`sp2ot_engine.io.labels_csv`,
  the one owner of that format);
* ``json``: ``{"images": [{filename, cluster, cluster_name, confidence, outlier_score, outlier,
  duplicate_of}...], "clusters": [{id, name, size, representatives: [filenames]}...], "curated":
  ..., "curation_edits": ..., "k_choice": ...}`` (``k_choice``: how the worker chose K, or null);
* ``labelstudio``: Label Studio's import JSON, one task per image with a prediction whose choice
  is the cluster name and whose score is the confidence;
* ``zip``: ``labels.csv`` (as the csv export), one folder per cluster holding the original
  images, and ``export.txt``. The originals are read from the stored upload through its
  manifest (:func:`app.storage.open_stored`), each copied in chunks. Written by :mod:`zipfile` to
  a sink that is emptied after every chunk (entries stored, sizes in data descriptors, ZIP64),
  so memory stays flat whatever the archive size.

Rows are read in batches through a server-side cursor; every generator owns its session.
"""
from __future__ import annotations

import bisect
import io
import json
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from app import results
from app.core.db import Database
from app.jobs.repository import JobRecord
from app.storage import open_stored
from sp2ot_engine.io.labels_csv import format_labels

FORMATS = ("json", "zip", "labelstudio", "csv")
BATCH = 5000
REPRESENTATIVES = 5
ZIP_CHUNK = 1 << 20
MISSING_LISTED = 1000  # names of missing originals listed in export.txt
LABEL_STUDIO_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="cluster" toName="image">'
                       '{choices}</Choices></View>')


def _rows(db: Database, job_id: str) -> Iterator[list]:
    """Batches of ``(idx, filename, cluster, confidence, outlier_score, outlier, duplicate_of)`` in image order."""
    with db.session() as session:
        result = session.execute(results.rows_query(job_id).execution_options(yield_per=BATCH))
        while True:
            rows = result.fetchmany(BATCH)
            if not rows:
                return
            yield rows


def snapshot(db: Database, job: JobRecord) -> tuple[list[results.Cluster], results.CurationInfo]:
    with db.read_session() as session:
        return results.clusters(session, job.id, job.n_clusters), results.curation_info(session, job.id)


def csv_stream(db: Database, job: JobRecord, curated: bool, spreadsheet_safe: bool = False) -> Iterator[bytes]:
    """labels.csv (:func:`sp2ot_engine.io.labels_csv.format_labels`, confidences with 4 decimals,
    the flag columns empty for a job clustered before they existed); when curated, a last
    column ``cluster_name`` (readers find columns by name); with ``spreadsheet_safe`` names that
    would run as formulas are quoted there."""
    names = {c.id: c.name for c in snapshot(db, job)[0]} if curated else None
    yield format_labels([], cluster_names=names).encode("utf-8")  # the header
    for rows in _rows(db, job.id):
        yield format_labels((row[1:] for row in rows), header=False, cluster_names=names,
                            spreadsheet_safe=spreadsheet_safe).encode("utf-8")


def json_stream(db: Database, job: JobRecord) -> Iterator[bytes]:
    clusters, info = snapshot(db, job)
    names = {c.id: c.name for c in clusters}
    head = {"job_id": job.id, "curated": info.curated, "curation_edits": info.edits,
            "k_choice": (job.summary or {}).get("k_choice")}
    yield json.dumps(head)[:-1].encode() + b', "images": ['
    first = True
    for rows in _rows(db, job.id):
        parts = [json.dumps({"filename": f, "cluster": c, "cluster_name": names.get(c, results.display_name(c, {})),
                             "confidence": round(p, 6), "outlier_score": None if s is None else round(s, 3),
                             "outlier": o, "duplicate_of": d}) for _, f, c, p, s, o, d in rows]
        yield ((b"" if first else b", ") + ", ".join(parts).encode())
        first = False
    with db.read_session() as session:
        out = [{"id": c.id, "name": c.name, "size": c.size,
                "representatives": [im.filename for im in
                                    results.images_of_cluster(session, job.id, c.id, limit=REPRESENTATIVES)]
                if c.size else []} for c in clusters]
    yield b'], "clusters": ' + json.dumps(out).encode() + b"}"


def label_studio_stream(db: Database, job: JobRecord, image_url: str) -> Iterator[bytes]:
    """``image_url``: a format string with ``{idx}`` giving each image's address on this server."""
    clusters, info = snapshot(db, job)
    names = {c.id: c.name for c in clusters}
    version = f"sp2ot-{job.id[:8]}" + ("-curated" if info.curated else "")
    yield b"["
    first = True
    for rows in _rows(db, job.id):
        tasks = []
        for idx, f, c, p, *_ in rows:
            name = names.get(c, results.display_name(c, {}))
            tasks.append(json.dumps({
                "data": {"image": image_url.format(idx=idx), "filename": f},
                "meta": {"sp2ot_job": job.id, "cluster": c, "curated": info.curated},
                "predictions": [{"model_version": version, "score": round(p, 6), "result": [{
                    "from_name": "cluster", "to_name": "image", "type": "choices",
                    "value": {"choices": [name]}, "score": round(p, 6)}]}],
            }))
        yield ((b"" if first else b", ") + ", ".join(tasks).encode())
        first = False
    yield b"]"


def label_studio_config(clusters: list[results.Cluster]) -> str:
    """The labelling configuration that matches the tasks' choices."""
    from html import escape

    choices = "".join(f'<Choice value="{escape(c.name, quote=True)}"/>' for c in clusters if c.size)
    return LABEL_STUDIO_CONFIG.format(choices=choices)


# ----------------------------------------------------------------------------------- zip
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def folder_names(clusters: list[results.Cluster]) -> dict[int, str]:
    """A distinct, file-system-safe folder name per cluster (its name, else ``cluster_<id>``)."""
    out: dict[int, str] = {}
    used: set[str] = set()
    for c in sorted(clusters, key=lambda c: c.id):
        base = _UNSAFE.sub("_", c.name).strip(" .") if c.named else f"cluster_{c.id}"
        name = base or f"cluster_{c.id}"
        if name.lower() in used:
            name = f"{name}_{c.id}"
        used.add(name.lower())
        out[c.id] = name
    return out


class _Sink(io.RawIOBase):
    """Where :class:`zipfile.ZipFile` writes: bytes collect here until the stream takes them. It
    has no ``tell``/``seek``, so zipfile streams (data descriptors instead of seeking back)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def zip_stream(db: Database, job: JobRecord, stored: Path) -> Iterator[bytes]:
    """The zip export; ``stored``: the job's stored upload (its originals, read through the
    manifest next to it). An original the upload no longer holds is listed in ``export.txt``."""
    clusters, info = snapshot(db, job)
    folders = folder_names(clusters)
    sink = _Sink()
    missing: list[str] = []  # the first MISSING_LISTED of them
    n_missing = 0
    try:
        images = open_stored(stored)
    except (OSError, ValueError):  # the dataset was deleted, or the upload changed
        images = None
    try:
        names = images.names if images is not None else []  # sorted: found by bisection, no index to hold
        when = time.localtime(stored.stat().st_mtime)[:6] if images is not None else time.localtime()[:6]
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(_entry("labels.csv", when), "w", force_zip64=True) as dest:  # streamed, a batch at a time
                for chunk in csv_stream(db, job, info.curated):
                    dest.write(chunk)
                    yield sink.take()
            for rows in _rows(db, job.id):
                for _, filename, cluster, *_ in rows:
                    i = bisect.bisect_left(names, filename)
                    try:
                        src = images.open_bytes(i) if names[i:i + 1] == [filename] else None
                    except OSError:
                        src = None
                    if src is None:
                        n_missing += 1
                        if len(missing) < MISSING_LISTED:
                            missing.append(filename)
                        continue
                    entry = _entry(f"{folders.get(cluster, f'cluster_{cluster}')}/{filename}", when)
                    with src, zf.open(entry, "w", force_zip64=True) as dest:
                        while chunk := src.read(ZIP_CHUNK):
                            dest.write(chunk)
                            yield sink.take()
                    yield sink.take()
            note = [f"sp2ot job {job.id}: {sum(c.size for c in clusters)} images, "
                    f"{sum(1 for c in clusters if c.size)} non-empty clusters, one folder each; "
                    "labels.csv numbers the folders' clusters.",
                    f"curated: {'yes, ' + str(info.edits) + ' edit(s)' if info.curated else 'no'}"]
            if n_missing:
                note.append(f"{n_missing} original image(s) are no longer stored and are missing"
                            + (f" (the first {len(missing)}):" if n_missing > len(missing) else ":"))
                note += missing
            zf.writestr("export.txt", "\n".join(note) + "\n")
        yield sink.take()
    finally:
        if images is not None:
            images.close()


def _entry(name: str, when: tuple) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, when)
    zi.compress_type = zipfile.ZIP_STORED
    return zi
