"""Completion callbacks: when a job with a ``callback_url`` is final (succeeded, failed or
cancelled), its JSON (as ``GET /jobs/{id}`` answers it) is POSTed there.

* **Only to allowed hosts**: the URL's host must be in ``SP2OT_CALLBACK_ALLOWED_HOSTS``, checked
  when the job is created (:func:`check_callback_url`, a 422 naming the setting) and again
  before each delivery; redirects are not followed. Empty setting: callbacks are disabled.
* **Signed**: header ``X-SP2OT-Signature: sha256=<hex HMAC-SHA256 of the body>``, keyed by the
  owner's callback secret (:func:`app.core.security.callback_secret`: derived from the server's
  secret and the API key; its owner reads it at ``GET /callback-secret``). A receiver recomputes
  the HMAC of the raw body and compares in constant time.
* **Retried with back-off**: up to ``SP2OT_CALLBACK_ATTEMPTS`` deliveries, ``SP2OT_CALLBACK_BACKOFF``
  seconds before the first retry, doubled each time; a 2xx answer is a delivery, anything else
  (another status, a timeout, a refused connection) is retried. Each attempt is counted on the
  job row first (:func:`app.jobs.repository.take_callback_attempt`), so two senders never post
  the same attempt; the outcome is in the job's ``callback`` field.
* **Never blocks a job**: with Celery, the worker sends a task (``sp2ot.send_callback``) after the
  job ended and retries it with a countdown; in embedded mode a thread of the API delivers
  (:class:`app.jobs.queue.EmbeddedQueue`). Whoever ends a job asks for the delivery
  (:meth:`app.jobs.queue.JobQueue.notify`); a job that is not final or has no pending callback
  is left alone, so asking twice is harmless.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.core.config import Settings
from app.core.db import Database
from app.core.security import callback_secret, load_or_create_secret, sign_body
from app.errors import UploadRejected
from app.jobs import repository
from app.schemas import job_out

log = logging.getLogger("sp2ot.callbacks")

SIGNATURE_HEADER = "X-SP2OT-Signature"


def check_callback_url(url: str, settings: Settings) -> str:
    """``url`` when it is an http(s) URL to an allowed host; else :class:`UploadRejected` (422)
    saying what to fix and naming ``SP2OT_CALLBACK_ALLOWED_HOSTS``."""
    hosts = settings.callback_hosts
    if not hosts:
        raise UploadRejected("callback_url: callbacks are disabled on this server (SP2OT_CALLBACK_ALLOWED_HOSTS is "
                             "empty). Leave callback_url out, or ask the administrator to allow your host.")
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host:
        raise UploadRejected(f"callback_url {url!r} is not an http:// or https:// URL with a host.")
    if host.lower() not in hosts:
        raise UploadRejected(f"callback_url: the host {host!r} is not allowed by SP2OT_CALLBACK_ALLOWED_HOSTS "
                             f"(allowed: {', '.join(sorted(hosts))}).")
    return url


@dataclass(frozen=True)
class Delivery:
    """What one call of :func:`deliver_once` did: ``done`` (nothing more to do: delivered, given
    up, or nothing was due) or a retry is wanted after ``retry_in`` seconds."""

    done: bool
    retry_in: float = 0.0
    outcome: str = ""


def _server_secret(settings: Settings) -> bytes:
    return load_or_create_secret(settings.secret_key, settings.data_dir / "secret_key")


def deliver_once(job_id: str, *, db: Database, settings: Settings, client=None) -> Delivery:
    """One delivery attempt of the job's callback, if one is due. ``client``: an
    ``httpx.Client`` (tests); by default one is made for the call."""
    import httpx

    with db.session() as s:
        due = repository.callback_due(s, job_id)
    if due is None:
        return Delivery(True, outcome="nothing due")
    job = due.job
    with db.begin() as s:
        if not repository.take_callback_attempt(s, job_id, job.callback_attempts):
            return Delivery(True, outcome="another sender has it")
    attempt = job.callback_attempts + 1
    job.callback_attempts = attempt
    try:
        check_callback_url(job.callback_url, settings)  # the setting may have changed since the job was made
    except UploadRejected as e:
        with db.begin() as s:
            repository.end_callback(s, job_id, repository.CALLBACK_FAILED, e.detail)
        return Delivery(True, outcome="host not allowed")
    body = job_out(job).model_dump_json().encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "sp2ot-callback",
               SIGNATURE_HEADER: sign_body(callback_secret(_server_secret(settings), due.key_hash), body),
               "X-SP2OT-Job": job_id, "X-SP2OT-Delivery-Attempt": str(attempt)}
    try:
        if client is None:
            with httpx.Client(timeout=settings.callback_timeout, follow_redirects=False) as own:
                status = own.post(job.callback_url, content=body, headers=headers).status_code
        else:
            status = client.post(job.callback_url, content=body, headers=headers).status_code
        error = None if 200 <= status < 300 else f"the receiver answered HTTP {status}"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"[:500]
    if error is None:
        with db.begin() as s:
            repository.end_callback(s, job_id, repository.CALLBACK_SENT)
        log.info("job %s: callback delivered (attempt %d)", job_id, attempt)
        return Delivery(True, outcome="sent")
    if attempt >= settings.callback_attempts:
        with db.begin() as s:
            repository.end_callback(s, job_id, repository.CALLBACK_FAILED,
                                    f"{error} (gave up after {attempt} attempts)")
        log.warning("job %s: callback failed %d times, giving up: %s", job_id, attempt, error)
        return Delivery(True, outcome="failed")
    with db.begin() as s:
        repository.note_callback_error(s, job_id, error)
    delay = settings.callback_backoff * 2 ** (attempt - 1)
    log.info("job %s: callback attempt %d failed (%s); retry in %.1f s", job_id, attempt, error, delay)
    return Delivery(False, retry_in=delay, outcome="retry")


def deliver(job_id: str, *, db: Database, settings: Settings, stop=None) -> str:
    """Every attempt of the job's callback in this thread, sleeping between them (embedded
    mode). ``stop``: a ``threading.Event`` that ends the waiting early (shutdown)."""
    while True:
        result = deliver_once(job_id, db=db, settings=settings)
        if result.done:
            return result.outcome
        if stop is not None:
            if stop.wait(result.retry_in):
                return "stopped"
        else:
            time.sleep(result.retry_in)
