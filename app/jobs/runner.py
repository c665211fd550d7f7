"""Runs one attempt of a job: :func:`execute_job`, called by the Celery task
(``worker/celery_app.py``) and by the API's embedded worker threads (``app.jobs.queue``).

Guarantees (the state changes themselves are :mod:`app.jobs.repository`'s):

* **idempotent**: a job is run only from ``queued`` (or ``running`` with a stale heartbeat,
  i.e. its worker died); a final job is never run again;
* **attempt token**: each start increments ``jobs.attempts``; every later write of this run
  (progress, heartbeat, result) is conditional on that number, so a superseded run (its
  worker was presumed dead, or the job was deleted) writes nothing and stops;
* **one transaction** finalises a success: the status update, the deletion of any earlier
  assignment rows and the bulk insert of the new ones;
* **progress** is written at most every ``progress_interval`` seconds (and at each stage
  change); the cancel flag is read at most every ``cancel_check_interval`` seconds, from
  the engine's ``should_stop`` callback, i.e. between training steps;
* a heartbeat thread refreshes ``heartbeat_at`` every ``heartbeat_interval`` seconds; when
  it stops (the worker died), the API's reaper ends or re-queues the job;
* **the upload is not scanned again**: the images are read through the manifest the API wrote
  next to the stored upload and each is decoded once to verify it (damaged pixel data is
  skipped); the estimator gets that collection, so its ``skipped_`` starts from the manifest's
  and is the job's whole list. The thumbnails are made from those decoded images
  (:class:`app.jobs.artifacts.Thumbnails` as the engine's ``on_decoded`` hook), not by
  decoding the originals again; a cancel is seen during that pass too.
"""
from __future__ import annotations

import gc
import importlib
import logging
import math
import sys
import threading
import time
from typing import Any

from app.core.config import Settings
from app.core.db import Database
from app.jobs import artifacts, repository
from app.models import JobStatus
from app.storage import Storage, open_stored
from sp2ot_engine.io.labels_csv import read_truth
from sp2ot_engine.options import PROGRESS_FIELDS, PROGRESS_TYPES, ProgressField, Stage

log = logging.getLogger("sp2ot.worker")

MAX_SKIPPED_REPORTED = 1000
CURVE_POINTS = 240  # loss/rho points kept in a running job's progress for the live curve


def _num(v: Any, kind: type) -> Any:
    if v is None:
        return None
    try:
        x = kind(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def clean_progress(info: dict[str, Any]) -> dict[str, Any]:
    """The engine's progress dict reduced to its fields (``PROGRESS_FIELDS``), each of its type
    (``PROGRESS_TYPES``) as a JSON-safe value; the stage cut to 40 characters, the percent to
    0..100."""
    out: dict[str, Any] = {}
    for k in PROGRESS_FIELDS:
        v = info.get(k)
        if PROGRESS_TYPES[k] is str:
            out[k] = None if v is None else str(v)[:40]
        else:
            out[k] = _num(v, PROGRESS_TYPES[k])
    p = out[ProgressField.PERCENT]
    out[ProgressField.PERCENT] = None if p is None else round(min(100.0, max(0.0, p)), 2)
    return out


def clean_history(history: Any) -> list[dict[str, Any]]:
    out = []
    for h in history or []:
        if isinstance(h, dict):
            out.append({"epoch": _num(h.get("epoch"), int), "loss": _num(h.get("loss"), float),
                        "rho": _num(h.get("rho"), float)})
    return out


def load_estimator_class(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr or "SP2OTClustering")


# ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class JobRun:
    """Callbacks and bookkeeping of one attempt of one job."""

    def __init__(self, db: Database, settings: Settings, job_id: str, attempt: int):
        self.db = db
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.stop_reason: str | None = None  # "cancel", "superseded", "timeout"
        self.deadline = time.monotonic() + settings.task_soft_time_limit
        self._last_progress = 0.0
        self._last_stage: str | None = None
        self._last_check = 0.0
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._curve: list[list[Any]] = []

    # --- progress(info) ---------------------------------------------------------------------
    def progress(self, info: dict[str, Any]) -> None:
        try:
            p = clean_progress(info if isinstance(info, dict) else {})
            self._add_curve_point(p)
            now = time.monotonic()
            if p["stage"] == self._last_stage and now - self._last_progress < self.settings.progress_interval:
                return
            self._last_progress, self._last_stage = now, p["stage"]
            self.write_progress({**p, "curve": list(self._curve)} if self._curve else p)
        except Exception:  # progress must never break training
            log.warning("job %s: cannot record progress", self.job_id, exc_info=True)

    def _add_curve_point(self, p: dict[str, Any]) -> None:
        """Every training step's loss and rho, halved whenever there are too many: the pages draw
        the curve of a running job from its progress."""
        if p["stage"] != "training" or p["loss"] is None:
            return
        x = p["step"] if p["step"] is not None else len(self._curve)
        if self._curve and self._curve[-1][0] == x:
            return
        self._curve.append([x, p["loss"], p["rho"]])
        if len(self._curve) > CURVE_POINTS:
            self._curve = self._curve[::2]

    def write_progress(self, p: dict[str, Any]) -> None:
        with self.db.begin() as s:
            current = repository.save_progress(s, self.job_id, self.attempt, p)
        if not current:
            self.stop_reason = self.stop_reason or "superseded"

    # --- should_stop() ----------------------------------------------------------------------
    def should_stop(self, *, now_please: bool = False) -> bool:
        """True when the attempt must stop (cancelled, deleted, superseded, out of time); reads
        the database at most every ``cancel_check_interval`` unless ``now_please``."""
        if self.stop_reason:
            return True
        now = time.monotonic()
        if now > self.deadline:
            self.stop_reason = "timeout"
            return True
        if now - self._last_check < self.settings.cancel_check_interval and not now_please:
            return False
        self._last_check = now
        try:
            with self.db.read_session() as s:
                reason = repository.stop_reason(s, self.job_id, self.attempt)
        except Exception:
            log.warning("job %s: cannot read the cancel flag", self.job_id, exc_info=True)
            return False
        self.stop_reason = self.stop_reason or reason
        return bool(self.stop_reason)

    # --- heartbeat --------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._hb_stop.wait(self.settings.heartbeat_interval):
                try:
                    with self.db.begin() as s:
                        current = repository.beat(s, self.job_id, self.attempt)
                    if not current:
                        self.stop_reason = self.stop_reason or "superseded"
                        return
                except Exception:
                    log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

        self._hb_thread = threading.Thread(target=beat, name=f"sp2ot-heartbeat-{self.job_id[:8]}", daemon=True)
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)

    # --- endings ----------------------------------------------------------------------------
    def finish(self, status: str, error: str | None = None, stage: str | None = None) -> bool:
        with self.db.begin() as s:
            return repository.end_attempt(s, self.job_id, self.attempt, status, error, stage)


# ---------------------------------------------------------------------------------------------
def _evaluation(storage: Storage, job_id: str, filenames: list[str], labels) -> dict[str, Any]:
    truth = read_truth(storage.truth_path(job_id))
    pairs = [(truth[f], int(c)) for f, c in zip(filenames, labels) if f in truth]
    classes = sorted({t for t, _ in pairs})
    info: dict[str, Any] = {"truth": {"n_labelled": len(pairs), "n_classes": len(classes)}, "evaluation": None}
    if len(pairs) < 2:
        info["evaluation_error"] = "fewer than 2 clustered images have a ground-truth label"
        return info
    import numpy as np

    from sp2ot_engine.metrics import evaluate

    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[t] for t, _ in pairs], dtype=np.int64)
    y_pred = np.array([c for _, c in pairs], dtype=np.int64)
    try:
        scores = evaluate(y_true, y_pred)
        info["evaluation"] = {str(k): _num(v, float) for k, v in scores.items()}
    except Exception as e:  # metrics must not fail an otherwise good job
        log.warning("job %s: evaluation failed", job_id, exc_info=True)
        info["evaluation_error"] = f"{type(e).__name__}: {e}"
    return info


def open_images(storage: Storage, run: JobRun, job: repository.JobRecord, thumbs: artifacts.Thumbnails):
    """The job's images through the stored upload's manifest, each decoded once to verify it
    (the estimator's ``loading`` stage), ``thumbs`` seeing every decoded image. Raises
    Cancelled when the job is cancelled meanwhile."""
    from sp2ot_engine import Cancelled

    def loading(done: int, total: int) -> None:
        if run.should_stop():
            raise Cancelled("stopped while reading the images")
        run.progress({"stage": Stage.LOADING, "percent": 100.0 * done / max(total, 1)})

    run.progress({"stage": Stage.LOADING, "percent": 0.0})
    return open_stored(storage.abs(job.input_path), verify=True, progress=loading, on_decoded=thumbs,
                       max_image_pixels=run.settings.max_image_pixels)


def execute_job(
    job_id: str,
    *,
    db: Database,
    settings: Settings,
    worker_name: str = "worker",
    takeover: bool = False,
) -> str:
    """Run one job to its end. Returns the outcome: succeeded, failed, cancelled,
    superseded, skipped (nothing to do) or busy (another live worker runs it)."""
    with db.begin() as s:
        claimed = repository.claim(s, job_id, worker_name=worker_name, heartbeat_timeout=settings.heartbeat_timeout,
                                   max_attempts=settings.max_attempts, takeover=takeover)
    if claimed is None:
        return "skipped"
    if claimed == repository.BUSY:
        return "busy"
    job = claimed.job
    storage = Storage(settings)
    run = JobRun(db, settings, job_id, claimed.attempt)
    run.start_heartbeat()
    log.info("job %s: attempt %d started on %s", job_id, claimed.attempt, worker_name)
    est = images = thumbs = None
    try:
        from sp2ot_engine import Cancelled

        try:
            from celery.exceptions import SoftTimeLimitExceeded
        except ImportError:  # pragma: no cover
            SoftTimeLimitExceeded = _Stop  # type: ignore[misc,assignment]
        try:
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
            cls = load_estimator_class(settings.estimator)
            kwargs: dict[str, Any] = dict(
                n_clusters=job.n_clusters, backbone=job.backbone, mode=job.mode, epochs=job.epochs,
                formulation=job.formulation, init=job.init, device=settings.device, random_state=job.seed,
                num_workers=settings.num_workers,
            )
            if job.n_clusters is None:  # the worker chooses K (issue 11)
                kwargs.update(k_min=job.k_min, k_max=job.k_max)
            if settings.batch_size:
                kwargs["batch_size"] = settings.batch_size
            est = cls(**kwargs)
            thumbs = artifacts.Thumbnails(storage.job_dir(job_id))
            images = open_images(storage, run, job, thumbs)
            est.fit(images, progress=run.progress, should_stop=run.should_stop)
            made = _make_artifacts(storage, run, est, job, thumbs)
            made["model"] = _save_model(run, est, storage)  # issue 11: POST /jobs/{id}/assign predicts with it
        except Cancelled:
            reason = run.stop_reason or "cancel"
            if reason == "cancel":
                return "cancelled" if run.finish(JobStatus.CANCELLED) else "superseded"
            if reason == "timeout":
                run.finish(JobStatus.FAILED, _timeout_message(settings), stage="failed")
                return "failed"
            log.info("job %s: attempt %d superseded or deleted; stopping", job_id, claimed.attempt)
            return "superseded"
        except SoftTimeLimitExceeded:
            run.finish(JobStatus.FAILED, _timeout_message(settings), stage="failed")
            return "failed"
        except ValueError as e:  # the engine's user-facing input errors
            run.finish(JobStatus.FAILED, str(e) or "invalid input", stage="failed")
            return "failed"
        except MemoryError:
            run.finish(JobStatus.FAILED, "The worker ran out of memory. Try fewer or smaller images, or a "
                       "smaller SP2OT_BATCH_SIZE.", stage="failed")
            return "failed"
        except Exception as e:
            if run.should_stop(now_please=True) and run.stop_reason == "superseded":
                # Deleted (its files with it) or taken over while running: the error is the deletion's echo.
                log.info("job %s: attempt %d stopped, the job was deleted or superseded (%s: %s)", job_id,
                         claimed.attempt, type(e).__name__, str(e)[:200])
                return "superseded"
            log.exception("job %s: clustering failed", job_id)
            msg = str(e).splitlines()[0][:500] if str(e) else ""
            hint = " Try a smaller SP2OT_BATCH_SIZE or fewer images." if "out of memory" in msg.lower() else ""
            run.finish(JobStatus.FAILED, f"Internal error while clustering ({type(e).__name__}: {msg}).{hint}",
                       stage="failed")
            return "failed"
        run.stop_heartbeat()
        return _finalize_success(db, storage, run, est, job, made)
    except Exception as e:
        if run.should_stop(now_please=True) and run.stop_reason == "superseded":
            log.info("job %s: attempt %d stopped while saving, the job was deleted or superseded (%s)", job_id,
                     claimed.attempt, type(e).__name__)
            return "superseded"
        log.exception("job %s: could not be finalised", job_id)
        try:
            run.finish(JobStatus.FAILED, f"Internal error while saving the results ({type(e).__name__}).",
                       stage="failed")
        except Exception:
            log.exception("job %s: cannot record the failure", job_id)
        return "failed"
    finally:
        run.stop_heartbeat()
        for opened in (thumbs, images):
            if opened is not None:
                opened.close()
        del est
        gc.collect()
        _free_device_memory()


def _timeout_message(settings: Settings) -> str:
    return (f"The job exceeded the time limit of {settings.task_soft_time_limit} s (SP2OT_TASK_SOFT_TIME_LIMIT). "
            "Use fewer images, fewer epochs or mode=fast.")


def _free_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_artifacts(storage: Storage, run: JobRun, est, job: repository.JobRecord,
                    thumbs: artifacts.Thumbnails) -> dict[str, Any]:
    """The thumbnails (made while the images were read, written here in the estimator's image
    order) and the 2-D map for the pages (``app.jobs.artifacts``). Neither fails the job: the
    pages show placeholders when they are missing. Raises Cancelled when asked to stop."""
    from sp2ot_engine import Cancelled

    job_dir = storage.job_dir(run.job_id)
    filenames = [str(f) for f in est.filenames_]
    made: dict[str, Any] = {"thumbnails": 0, "thumb_size": artifacts.THUMB_SIZE, "map": None}

    def report(stage: str, percent: float) -> None:
        run.progress({"stage": stage, "percent": percent})

    try:
        made["thumbnails"] = thumbs.write(filenames, progress=report, should_stop=run.should_stop)
    except artifacts.Stopped:
        raise Cancelled("stopped while making thumbnails") from None
    except Exception:
        if run.should_stop(now_please=True):  # deleted (its folder with it) or cancelled meanwhile
            raise Cancelled("stopped while making thumbnails") from None
        log.warning("job %s: cannot make the thumbnails", run.job_id, exc_info=True)
    features = getattr(est, "features_", None)  # the engine's features, when it keeps them
    if features is not None and len(features) == len(filenames):
        report("map", 0.0)
        try:
            coords, made["map"] = artifacts.project_2d(features, seed=job.seed)
            artifacts.write_map(coords, job_dir)
        except Exception:
            made["map"] = None
            log.warning("job %s: cannot project the features to 2-D", run.job_id, exc_info=True)
    if run.should_stop():
        raise Cancelled("stopped after making the thumbnails")
    return made


def _save_model(run: JobRun, est, storage: Storage) -> bool:
    """The fitted model as a job artifact (``app.jobs.artifacts.save_model``); a job whose model
    cannot be saved still succeeds (its assign requests are refused with a 409)."""
    try:
        return artifacts.save_model(est, storage.job_dir(run.job_id)) is not None
    except Exception:
        log.warning("job %s: cannot save the fitted model", run.job_id, exc_info=True)
        return False


def _finalize_success(db: Database, storage: Storage, run: JobRun, est, job: repository.JobRecord,
                      made: dict[str, Any] | None = None) -> str:
    job_id = run.job_id
    filenames = [str(f) for f in est.filenames_]
    labels = [int(x) for x in est.labels_]
    confidences = [float(x) for x in est.confidences_]
    if not (len(filenames) == len(labels) == len(confidences)):
        raise RuntimeError("the estimator returned lists of different lengths")
    sizes = [int(x) for x in est.cluster_sizes_]
    skipped = sorted((str(name), str(reason)) for name, reason in getattr(est, "skipped_", []))
    summary = {
        "n_images": len(filenames), "n_clusters": job.n_clusters, "cluster_sizes": sizes,
        "n_skipped": len(skipped),
        "skipped": [{"name": n, "reason": r} for n, r in skipped[:MAX_SKIPPED_REPORTED]],
        "artifacts": made or {},
        "start": getattr(est, "start_", None),
        "start_scores": {str(k): float(v) for k, v in getattr(est, "start_scores_", {}).items()},
        "start_notes": [str(n) for n in getattr(est, "start_notes_", [])],
        **_k_and_flag_summary(est, job),
    }
    history = clean_history(getattr(est, "history_", []))
    metrics = _evaluation(storage, job_id, filenames, labels) if job.has_truth else None
    last = history[-1] if history else {}
    progress = clean_progress({"stage": Stage.DONE, "percent": 100.0, "epoch": last.get("epoch"),
                               "loss": last.get("loss"), "rho": last.get("rho")})
    with db.begin() as s:
        written = repository.record_success(
            s, job_id, run.attempt, summary=summary, history=history, metrics=metrics, progress=progress,
            filenames=filenames, labels=labels, confidences=confidences, flags=_image_flags(est, filenames),
            n_clusters=summary["n_clusters"] if job.n_clusters is None else None,
        )
    if written:
        log.info("job %s: succeeded (%d images)", job_id, len(filenames))
        return "succeeded"
    # Cancelled at the last moment, superseded or deleted.
    if run.finish(JobStatus.CANCELLED):
        return "cancelled"
    return "superseded"


# ---------------------------------------------------------------- chosen K and image flags (issue 11)
def _k_and_flag_summary(est, job: repository.JobRecord) -> dict[str, Any]:
    """The K used (``n_clusters``), how it was chosen when the job left it to the worker, and
    how many images the engine flagged."""
    out: dict[str, Any] = {"n_clusters": int(getattr(est, "n_clusters_", None) or job.n_clusters
                                             or len(est.cluster_sizes_))}
    curve = getattr(est, "k_curve_", None) or {}
    if job.n_clusters is None and curve:
        out["k_choice"] = {"chosen": out["n_clusters"], "criterion": str(est.k_criterion_),
                           "k_min": min(curve), "k_max": max(curve),
                           "curve": [[int(k), _num(v, float)] for k, v in sorted(curve.items())]}
    if getattr(est, "outliers_", None) is not None:
        out["n_outliers"] = int(sum(bool(x) for x in est.outliers_))
        out["n_duplicates"] = int(sum(int(d) >= 0 for d in est.duplicate_of_))
    return out


def _image_flags(est, filenames: list[str]) -> repository.ImageFlags | None:
    """The engine's per-image flags with ``duplicate_of`` as the earlier image's filename."""
    if getattr(est, "outliers_", None) is None:
        return None
    return repository.ImageFlags(
        outlier_scores=[_num(x, float) for x in est.outlier_scores_],
        outliers=[bool(x) for x in est.outliers_],
        duplicate_of=[filenames[int(d)] if int(d) >= 0 else None for d in est.duplicate_of_],
    )
