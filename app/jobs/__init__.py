"""The life of a job, in one package.

* :mod:`app.jobs.repository`: every query and every state change of a job (the state machine);
* :mod:`app.jobs.runner`: runs one attempt of a job (heartbeat, progress, cancel checks, results);
* :mod:`app.jobs.queue`: hands jobs to workers (Celery by task name, or threads of the API);
* :mod:`app.jobs.reaper`: the API process's loop that ends or re-queues jobs whose worker is gone.

``worker/celery_app.py`` is a thin Celery shell over :mod:`app.jobs.runner`.
"""
