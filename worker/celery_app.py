"""The Celery application (``celery -A worker.celery_app worker``, or ``sp2ot worker``).

Reliability settings: tasks are acknowledged only when finished (``acks_late``) and given
back to the queue if the worker process is lost, a worker holds one task at a time
(``worker_prefetch_multiplier=1``), and a task whose worker died is delivered again after
``SP2OT_BROKER_VISIBILITY_TIMEOUT`` seconds (Redis). The task itself is idempotent
(see ``worker/tasks.py``).
"""
from __future__ import annotations

import logging
import os

# Idle OpenMP threads sleep instead of spinning (see app/cli.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery, signals

from app.core.config import Settings, get_settings

log = logging.getLogger("sp2ot.worker")


def celery_config(settings: Settings) -> dict:
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.broker_restore_interval,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
    if settings.broker_key_prefix:
        transport["global_keyprefix"] = settings.broker_key_prefix
    return dict(
        broker_url=settings.broker_url or "memory://",
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )


def make_celery(settings: Settings) -> Celery:
    app = Celery("sp2ot", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


celery_app = Celery("sp2ot", include=["worker.tasks"])
celery_app.conf.update(celery_config(get_settings()))
app = celery_app  # `celery -A worker.celery_app` finds `app` / `celery_app`


@signals.worker_init.connect
def _migrate_on_start(**_kwargs) -> None:
    """Bring the schema up to date before consuming (the API does the same)."""
    settings = get_settings()
    settings.ensure_dirs()
    if settings.run_migrations:
        from app.core.db import run_migrations

        run_migrations(settings)
    log.info(
        "sp2ot worker: queue=%s device=%s visibility_timeout=%ss",
        settings.queue, settings.device, settings.visibility_timeout,
    )


@signals.worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    from worker import tasks

    tasks.reset_database()
