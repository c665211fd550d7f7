"""Celery worker of the sp2ot service: ``worker.celery_app``, a thin shell over ``app.jobs.runner``."""
