"""Reads of a succeeded job's results for the pages and the exports: clusters (current sizes and
names), pages of images, search, the least confident images, the evaluation against a truth CSV.

Every query reads the ``assignments`` rows of one job through an index
(``ix_assignments_job_cluster_conf``, ``ix_assignments_job_conf`` or the primary key) and is
paginated, so a page costs the same for 500 or 50,000 images. ``assignments.cluster`` is the
current cluster (curated, if a person edited the clusters: ``app.curation`` writes it).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, literal, select, union_all
from sqlalchemy.orm import Session

from app.models import Assignment, ClusterName, CurationEdit

DEFAULT_NAME = "cluster {}"


@dataclass(frozen=True)
class Cluster:
    id: int
    name: str
    size: int
    named: bool  # a person gave it its name


@dataclass(frozen=True)
class Image:
    idx: int
    filename: str
    cluster: int
    confidence: float


@dataclass(frozen=True)
class CurationInfo:
    edits: int
    last_edit_id: int
    last_edit_at: Any = None

    @property
    def version(self) -> str:
        """Names one curation state (ids can be reused after an undo on SQLite: the time too)."""
        return f"{self.edits}:{self.last_edit_id}:{self.last_edit_at}"

    @property
    def curated(self) -> bool:
        return self.edits > 0


def _image(row) -> Image:
    return Image(int(row.idx), row.filename, int(row.cluster), float(row.confidence))


_IMAGE_COLUMNS = (Assignment.idx, Assignment.filename, Assignment.cluster, Assignment.confidence)


def curation_info(session: Session, job_id: str) -> CurationInfo:
    row = session.execute(
        select(func.count(CurationEdit.id), func.max(CurationEdit.id), func.max(CurationEdit.created_at))
        .where(CurationEdit.job_id == job_id)
    ).one()
    return CurationInfo(int(row[0] or 0), int(row[1] or 0), row[2])


def cluster_names(session: Session, job_id: str) -> dict[int, str]:
    return dict(session.execute(select(ClusterName.cluster, ClusterName.name)
                                .where(ClusterName.job_id == job_id)).all())


def cluster_sizes(session: Session, job_id: str) -> dict[int, int]:
    """Current size of every non-empty cluster."""
    rows = session.execute(select(Assignment.cluster, func.count()).where(Assignment.job_id == job_id)
                           .group_by(Assignment.cluster))
    return {int(c): int(n) for c, n in rows}


def cluster_count(n_clusters: int, sizes: dict[int, int]) -> int:
    """Cluster ids run from 0 to this minus 1: the engine's K, plus any a curation created."""
    return max(n_clusters, max(sizes, default=-1) + 1)


def display_name(cluster: int, names: dict[int, str]) -> str:
    return names.get(cluster) or DEFAULT_NAME.format(cluster)


def clusters(session: Session, job_id: str, n_clusters: int, engine_sizes: list[int] | None = None,
             curated: bool = True) -> list[Cluster]:
    """Every cluster, largest first (ties by id); merged-away and empty ones last with size 0.
    An uncurated job's sizes are the engine's (``engine_sizes``, from the job's summary): no scan."""
    if not curated and engine_sizes is not None:
        sizes = {c: int(n) for c, n in enumerate(engine_sizes) if n}
    else:
        sizes = cluster_sizes(session, job_id)
    names = cluster_names(session, job_id)
    out = [Cluster(c, display_name(c, names), sizes.get(c, 0), c in names)
           for c in range(cluster_count(n_clusters, sizes))]
    out.sort(key=lambda c: (-c.size, c.id))
    return out


def images_of_cluster(session: Session, job_id: str, cluster: int, *, offset: int = 0, limit: int = 60,
                      least_confident: bool = False) -> list[Image]:
    order = Assignment.confidence.asc() if least_confident else Assignment.confidence.desc()
    rows = session.execute(
        select(*_IMAGE_COLUMNS).where(Assignment.job_id == job_id, Assignment.cluster == cluster)
        .order_by(order, Assignment.idx).offset(offset).limit(limit)
    )
    return [_image(r) for r in rows]


def card_images(session: Session, job_id: str, cluster_ids: list[int], top: int,
                least: int) -> dict[int, tuple[list[Image], list[Image]]]:
    """The ``top`` most and ``least`` least confident images of each cluster, in one round trip
    (one index range per cluster and direction)."""
    if not cluster_ids:
        return {}
    parts = []
    for slot, (cluster, desc, limit) in enumerate(
            (c, d, n) for c in cluster_ids for d, n in ((True, top), (False, least)) if n):
        order = Assignment.confidence.desc() if desc else Assignment.confidence.asc()
        inner = (select(*_IMAGE_COLUMNS).where(Assignment.job_id == job_id, Assignment.cluster == cluster)
                 .order_by(order, Assignment.idx).limit(limit).subquery())
        parts.append(select(literal(slot).label("slot"), literal(int(desc)).label("top"), *inner.c))
    out: dict[int, tuple[list[Image], list[Image]]] = {c: ([], []) for c in cluster_ids}
    rows = session.execute(union_all(*parts)).all()
    for row in sorted(rows, key=lambda r: r.slot):  # each part keeps its order within its slot
        out[int(row.cluster)][0 if row.top else 1].append(_image(row))
    for c in cluster_ids:
        out[c][0].sort(key=lambda im: (-im.confidence, im.idx))
        out[c][1].sort(key=lambda im: (im.confidence, im.idx))
    return out


def least_confident(session: Session, job_id: str, *, offset: int = 0, limit: int = 60) -> list[Image]:
    """The images the clustering is least sure of, across all clusters."""
    rows = session.execute(
        select(*_IMAGE_COLUMNS).where(Assignment.job_id == job_id)
        .order_by(Assignment.confidence.asc(), Assignment.idx).offset(offset).limit(limit)
    )
    return [_image(r) for r in rows]


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search(session: Session, job_id: str, text: str, *, offset: int = 0, limit: int = 60) -> list[Image]:
    """Images whose file name contains ``text`` (case-insensitive), in image order."""
    rows = session.execute(
        select(*_IMAGE_COLUMNS)
        .where(Assignment.job_id == job_id, Assignment.filename.ilike(_like_pattern(text), escape="\\"))
        .order_by(Assignment.idx).offset(offset).limit(limit)
    )
    return [_image(r) for r in rows]


def image(session: Session, job_id: str, idx: int) -> Image | None:
    row = session.execute(select(*_IMAGE_COLUMNS).where(Assignment.job_id == job_id, Assignment.idx == idx)).first()
    return _image(row) if row is not None else None


def images_by_name(session: Session, job_id: str, filenames: list[str]) -> dict[str, Image]:
    found: dict[str, Image] = {}
    for i in range(0, len(filenames), 500):
        chunk = filenames[i:i + 500]
        rows = session.execute(select(*_IMAGE_COLUMNS)
                               .where(Assignment.job_id == job_id, Assignment.filename.in_(chunk)))
        found.update({r.filename: _image(r) for r in rows})
    return found


def labels_in_order(session: Session, job_id: str) -> list[int]:
    """The current cluster of every image, in image order (the map colours its points with it)."""
    return [int(c) for c in session.scalars(select(Assignment.cluster).where(Assignment.job_id == job_id)
                                            .order_by(Assignment.idx))]


def rows_query(job_id: str):
    """``(idx, filename, cluster, confidence, outlier_score, outlier, duplicate_of)`` of every
    image, in image order (the exports stream it; the flags are null for older jobs)."""
    return (select(*_IMAGE_COLUMNS, Assignment.outlier_score, Assignment.outlier, Assignment.duplicate_of)
            .where(Assignment.job_id == job_id).order_by(Assignment.idx))


# ------------------------------------------------------------------------- evaluation
_EVAL_CACHE: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_EVAL_LOCK = threading.Lock()


def evaluation(session: Session, job_id: str, truth_path: Path, version: str) -> dict[str, Any]:
    """The paper's metrics and a per-class table of the current clusters against the truth CSV.
    Cached per curation state (``version``: :attr:`CurationInfo.version`), so a page costs one read."""
    key = (job_id, version)
    with _EVAL_LOCK:
        if key in _EVAL_CACHE:
            _EVAL_CACHE.move_to_end(key)
            return _EVAL_CACHE[key]
    result = _evaluate(session, job_id, truth_path)
    with _EVAL_LOCK:
        _EVAL_CACHE[key] = result
        while len(_EVAL_CACHE) > 32:
            _EVAL_CACHE.popitem(last=False)
    return result


def _evaluate(session: Session, job_id: str, truth_path: Path) -> dict[str, Any]:
    import numpy as np

    from sp2ot_engine.io.labels_csv import read_truth
    from sp2ot_engine.metrics import evaluate, group_sizes, match_clusters

    truth = read_truth(truth_path) if truth_path.is_file() else {}
    pairs = [(truth[f], int(c)) for f, c in session.execute(
        select(Assignment.filename, Assignment.cluster).where(Assignment.job_id == job_id)) if f in truth]
    out: dict[str, Any] = {"n_labelled": len(pairs), "n_classes": len({t for t, _ in pairs}), "evaluation": None,
                           "classes": []}
    if len(pairs) < 2:
        out["error"] = "fewer than 2 clustered images have a ground-truth label"
        return out
    y_true = [t for t, _ in pairs]
    y_pred = np.array([c for _, c in pairs], dtype=np.int64)
    scores = evaluate(y_true, y_pred)
    out["evaluation"] = {k: (None if v != v else float(v)) for k, v in scores.items()}  # nan -> None
    to_class = match_clusters(y_true, y_pred)
    to_cluster = {cls: cl for cl, cls in to_class.items()}
    class_size: dict[str, int] = {}
    cluster_size: dict[int, int] = {}
    correct: dict[str, int] = {}
    for t, c in pairs:
        class_size[t] = class_size.get(t, 0) + 1
        cluster_size[c] = cluster_size.get(c, 0) + 1
        if to_class.get(c) == t:
            correct[t] = correct.get(t, 0) + 1
    order = sorted(class_size, key=lambda t: (-class_size[t], t))  # the metric's head/tail order
    n_head, n_med, _ = group_sizes(len(order))
    for rank, t in enumerate(order):
        cluster = to_cluster.get(t)
        hit = correct.get(t, 0)
        recall = hit / class_size[t]
        precision = hit / cluster_size[cluster] if cluster is not None else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        group = "head" if rank < n_head else "medium" if rank < n_head + n_med else "tail"
        out["classes"].append({"label": t, "size": class_size[t], "group": group, "cluster": cluster,
                               "acc": recall, "precision": precision, "f1": f1})
    return out
